"""Slide-level metrics in NumPy, each checked against hand-computed values in the tests.

Conventions, chosen to match how papers report them (scikit-learn / scikit-survival):
- AUROC is the Mann–Whitney statistic: a tied positive/negative pair counts one half.
- Sensitivity at a specificity is the best sensitivity over thresholds ``score >= t`` whose
  specificity is at least the target, without interpolation between ROC points.
- Harrell's C-index compares a pair when the shorter time is an event; an event and a censored
  time that are equal are comparable (the censored one was still at risk), two equal event times
  are not; tied risks count one half.
Undefined values (one class only, no comparable pair, constant input) are NaN, never an exception,
so one degenerate fold does not abort a cross-validation report.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats


def auroc(y: ArrayLike, score: ArrayLike) -> float:
    """Binary AUROC of ``score`` for ``y`` (truthy = positive)."""
    y = np.asarray(y).astype(bool)
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = stats.rankdata(np.asarray(score, np.float64))
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auroc_ovr(y: ArrayLike, probs: ArrayLike) -> float:
    """Macro one-vs-rest AUROC over the classes present in ``y`` (class indices into ``probs`` columns)."""
    y = np.asarray(y).astype(int)
    probs = np.asarray(probs, np.float64)
    values = [auroc(y == c, probs[:, c]) for c in np.unique(y)]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def roc_curve(y: ArrayLike, score: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, np.float64)
    order = np.argsort(-score, kind="stable")
    s, yy = score[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(yy)[last]
    fp = np.cumsum(~yy)[last]
    n1, n0 = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fp / n0], np.r_[0.0, tp / n1]


def sensitivity_at_specificity(y: ArrayLike, score: ArrayLike, specificity: float) -> float:
    """Highest sensitivity among thresholds whose specificity is at least ``specificity``."""
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    fpr, tpr = roc_curve(y, score)
    return float(tpr[(1 - fpr) >= specificity - 1e-12].max())


def balanced_accuracy(y: ArrayLike, pred: ArrayLike) -> float:
    """Mean recall over the classes present in ``y``."""
    y, pred = np.asarray(y).astype(int), np.asarray(pred).astype(int)
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def quadratic_weighted_kappa(y: ArrayLike, pred: ArrayLike, n_classes: int | None = None) -> float:
    """Cohen's kappa with quadratic weights (i − j)² between ordinal levels 0..n_classes−1."""
    y, pred = np.asarray(y).astype(int), np.asarray(pred).astype(int)
    k = n_classes or int(max(y.max(), pred.max())) + 1
    observed = np.zeros((k, k))
    np.add.at(observed, (y, pred), 1)
    expected = np.outer(observed.sum(1), observed.sum(0)) / y.size
    levels = np.arange(k)
    weights = (levels[:, None] - levels[None, :]) ** 2
    denominator = (weights * expected).sum()
    return float(1 - (weights * observed).sum() / denominator) if denominator > 0 else float("nan")


def c_index(time: ArrayLike, event: ArrayLike, risk: ArrayLike) -> float:
    """Harrell's concordance index: higher risk should mean shorter survival."""
    time = np.asarray(time, np.float64)
    event = np.asarray(event).astype(bool)
    risk = np.asarray(risk, np.float64)
    concordant = 0.0
    comparable = 0
    events = np.flatnonzero(event)
    for start in range(0, events.size, 1024):
        i = events[start:start + 1024, None]
        pairs = (time[None, :] > time[i]) | ((time[None, :] == time[i]) & ~event[None, :])
        concordant += (pairs & (risk[i] > risk[None, :])).sum() + 0.5 * (pairs & (risk[i] == risk[None, :])).sum()
        comparable += int(pairs.sum())
    return float(concordant / comparable) if comparable else float("nan")


def kaplan_meier(time: ArrayLike, event: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Product-limit survival estimate: step times (starting at 0) and S(t) just after each step."""
    time = np.asarray(time, np.float64)
    event = np.asarray(event).astype(bool)
    steps = np.unique(time[event])
    at_risk = (time[None, :] >= steps[:, None]).sum(1)
    deaths = (event[None, :] & (time[None, :] == steps[:, None])).sum(1)
    return np.r_[0.0, steps], np.r_[1.0, np.cumprod(1 - deaths / at_risk)]


def logrank_p(time: ArrayLike, event: ArrayLike, group: ArrayLike) -> float:
    """p-value of the k-group log-rank test (χ² with k − 1 degrees of freedom)."""
    time = np.asarray(time, np.float64)
    event = np.asarray(event).astype(bool)
    labels, g = np.unique(np.asarray(group), return_inverse=True)
    k = labels.size
    if k < 2 or not event.any():
        return float("nan")
    observed_minus_expected = np.zeros(k)
    variance = np.zeros((k, k))
    for t in np.unique(time[event]):
        at_risk = np.bincount(g[time >= t], minlength=k).astype(np.float64)
        deaths = np.bincount(g[(time == t) & event], minlength=k).astype(np.float64)
        n, d = at_risk.sum(), deaths.sum()
        observed_minus_expected += deaths - d * at_risk / n
        if n > 1:
            share = at_risk / n
            variance += d * (n - d) / (n - 1) * (np.diag(share) - np.outer(share, share))
    u, v = observed_minus_expected[:-1], variance[:-1, :-1]
    try:
        statistic = float(u @ np.linalg.solve(v, u))
    except np.linalg.LinAlgError:
        return float("nan")
    return float(stats.chi2.sf(statistic, k - 1))


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson correlation of average ranks (ties share their mean rank)."""
    return pearson(stats.rankdata(x), stats.rankdata(y))


def bootstrap_ci(statistic: Callable[[np.ndarray], ArrayLike], n: int, *, groups: ArrayLike | None = None,
                 n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of ``statistic(indices)`` over resamples of 0..n−1.

    ``statistic`` may return one value or a vector (several metrics from one resample); the bounds
    have its shape. With ``groups`` whole groups (patients) are resampled, so slides of one patient
    stay together and the interval is not narrowed by their correlation. Resamples where a value is
    undefined (e.g. one class drawn) are skipped for that value; with fewer than 10 % valid the
    bounds are NaN.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        members = [np.array([i]) for i in range(n)]
    else:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    values = np.array([np.asarray(statistic(np.concatenate([members[i] for i in
                                                               rng.integers(0, len(members), len(members))])),
                                  np.float64) for _ in range(n_boot)])
    tail = (1 - level) / 2 * 100
    valid = (~np.isnan(values)).sum(0) >= max(10, n_boot // 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(values, [tail, 100 - tail], axis=0)
    return np.where(valid, lo, np.nan), np.where(valid, hi, np.nan)


def _midranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of each row of ``x``, ties sharing their mean rank."""
    return stats.rankdata(x, axis=-1)


def delong(y: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of the rows of ``scores`` (k, n) for ``y`` and their covariance (k, k), by DeLong et al. (1988)
    computed with the midrank algorithm of Sun & Xu (2014), O(k n log n).

    Each positive's placement value is the share of negatives it outranks (ties one half), each
    negative's the share of positives that outrank it; the AUROC is their mean and its variance is
    var(positive placements)/m + var(negative placements)/n, covariances likewise across rows.
    """
    y = np.asarray(y).astype(bool)
    s = np.atleast_2d(np.asarray(scores, np.float64))
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        nan = np.full(s.shape[0], np.nan)
        return nan, np.full((s.shape[0], s.shape[0]), np.nan)
    pos, neg = s[:, y], s[:, ~y]
    tz = _midranks(np.concatenate([pos, neg], axis=1))
    tx, ty = _midranks(pos), _midranks(neg)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1 - (tz[:, m:] - ty) / m
    aucs = v10.mean(1)
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def delong_paired(y: ArrayLike, a: ArrayLike, b: ArrayLike) -> tuple[float, float, float]:
    """DeLong's test of two correlated AUROCs on the same slides: (AUROC a − AUROC b, its standard error,
    two-sided p). NaN where a class has fewer than two slides or both scores rank the slides alike."""
    aucs, cov = delong(y, np.stack([np.asarray(a, np.float64), np.asarray(b, np.float64)]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if not var > 0:
        return diff, float("nan"), float("nan")
    se = math.sqrt(var)
    return diff, se, float(2 * stats.norm.sf(abs(diff) / se))
