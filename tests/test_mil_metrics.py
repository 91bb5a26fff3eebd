"""Metric functions against values computed by hand (worked out in the comments) or with SciPy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from featurestore.distill import metrics as M


def test_auroc_counts_ties_as_half():
    # positives 0.35, 0.8, 0.4 vs negatives 0.1, 0.4, 0.4: 1 + 3 + (1 + 0.5 + 0.5) = 6 of 9 pairs
    y = [0, 0, 1, 1, 0, 1]
    s = [0.1, 0.4, 0.35, 0.8, 0.4, 0.4]
    assert M.auroc(y, s) == pytest.approx(6 / 9)
    assert M.auroc([1, 1, 0], [0.9, 0.8, 0.1]) == 1.0
    assert np.isnan(M.auroc([1, 1], [0.2, 0.3]))


def test_auroc_macro_one_vs_rest():
    y = np.array([0, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.1, 0.2, 0.7], [0.2, 0.7, 0.1]])
    # class 0: 0.8 > 0.3, 0.1, 0.2 -> 1; class 1: 0.6 > 0.1, 0.2 but < 0.7 -> 2/3;
    # class 2: positives 0.7 and 0.1 vs negatives 0.1, 0.1 -> (2 + 0.5 + 0.5) / 4
    assert M.auroc_ovr(y, probs) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)


def test_roc_curve_and_sensitivity_at_specificity():
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0]
    s = [0.9, 0.8, 0.55, 0.3, 0.7, 0.5, 0.4, 0.2, 0.1]
    fpr, tpr = M.roc_curve(y, s)
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.2, 0.2, 0.4, 0.6, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(tpr, [0, 0.25, 0.5, 0.5, 0.75, 0.75, 0.75, 1.0, 1.0, 1.0])
    # best tpr among points with 1 - fpr >= target
    assert M.sensitivity_at_specificity(y, s, 0.8) == 0.75
    assert M.sensitivity_at_specificity(y, s, 0.6) == 0.75
    assert M.sensitivity_at_specificity(y, s, 0.4) == 1.0
    assert M.sensitivity_at_specificity(y, s, 1.0) == 0.5


def test_roc_curve_groups_tied_scores_into_one_point():
    fpr, tpr = M.roc_curve([1, 0, 1, 0], [0.5, 0.5, 0.9, 0.1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])


def test_balanced_accuracy():
    # recalls: class 0 2/3, class 1 1/2, class 2 1
    assert M.balanced_accuracy([0, 0, 0, 1, 1, 2], [0, 1, 0, 1, 0, 2]) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_quadratic_weighted_kappa():
    # O has (0,0), (1,2), (2,2), (2,1); sum W*O = 1 + 1 = 2; E = outer([1,1,2],[1,1,2]) / 4; sum W*E = 5.5
    assert M.quadratic_weighted_kappa([0, 1, 2, 2], [0, 2, 2, 1], 3) == pytest.approx(1 - 2 / 5.5)
    assert M.quadratic_weighted_kappa([0, 1, 2, 3], [0, 1, 2, 3]) == 1.0
    assert M.quadratic_weighted_kappa([0, 1, 2], [2, 1, 0]) == pytest.approx(-1.0)


def test_c_index_with_censoring_and_ties():
    time = [2, 3, 3, 5, 6, 6]
    event = [1, 1, 0, 1, 0, 1]
    risk = [0.9, 0.5, 0.7, 0.5, 0.1, 0.3]
    # event at 2: 5 pairs, all concordant. event at 3 (r .5): the censored 3 is comparable (tie, censored
    # still at risk) and discordant, 5 (r .5) ties -> .5, both 6s concordant: 2.5 of 4. event at 5: 2 of 2.
    # event at 6: only the censored 6, concordant: 1 of 1. Total 10.5 of 12.
    assert M.c_index(time, event, risk) == pytest.approx(10.5 / 12)
    # add an event at 3 with risk .2: not comparable with the other event at 3 (tied event times);
    # it adds 1 concordant pair for the event at 2, and 1 of 4 pairs of its own
    assert M.c_index([*time, 3], [*event, 1], [*risk, 0.2]) == pytest.approx(12.5 / 17)
    assert np.isnan(M.c_index([1, 2], [0, 0], [0.1, 0.2]))


def test_kaplan_meier():
    # at 1: 6 at risk, 1 death; at 2: 5 at risk (the censored 2 still counts), 1 death; at 3: 3, 1; at 5: 1, 1
    t, s = M.kaplan_meier([1, 2, 2, 3, 4, 5], [1, 1, 0, 1, 0, 1])
    np.testing.assert_allclose(t, [0, 1, 2, 3, 5])
    np.testing.assert_allclose(s, [1, 5 / 6, 5 / 6 * 4 / 5, 5 / 6 * 4 / 5 * 2 / 3, 0])


def test_logrank_two_groups():
    # A = {1, 3}, B = {2, 4}, all events. O - E for A: (1 - 1/2) + (0 - 1/3) + (1 - 1/2) = 2/3;
    # V = 1/4 + 2/9 + 1/4 = 13/18; chi2 = (2/3)^2 / (13/18)
    p = M.logrank_p([1, 3, 2, 4], [1, 1, 1, 1], ["A", "A", "B", "B"])
    assert p == pytest.approx(stats.chi2.sf((2 / 3) ** 2 / (13 / 18), 1))
    assert np.isnan(M.logrank_p([1, 2], [1, 1], [0, 0]))


def test_pearson_and_spearman_with_ties():
    assert M.pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]: cov 4.5, var 4.5 and 5
    assert M.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / np.sqrt(4.5 * 5))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert M.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert M.spearman(np.round(x), y) == pytest.approx(stats.spearmanr(np.round(x), y)[0])
    assert np.isnan(M.pearson([1, 1, 1], [1, 2, 3]))


def test_bootstrap_ci_covers_the_estimate_and_keeps_groups_together():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 1.0, 200)
    lo, hi = M.bootstrap_ci(lambda idx: x[idx].mean(), x.size, n_boot=400)
    assert lo < x.mean() < hi and hi - lo == pytest.approx(2 * 1.96 / np.sqrt(200), rel=0.25)
    assert M.bootstrap_ci(lambda idx: x[idx].mean(), x.size, n_boot=50, seed=3) == \
        M.bootstrap_ci(lambda idx: x[idx].mean(), x.size, n_boot=50, seed=3)

    groups = np.repeat(np.arange(10), 2)
    seen = []

    def pairs_intact(idx):
        seen.append(np.bincount(groups[idx], minlength=10) % 2 == 0)
        return float(len(idx))

    M.bootstrap_ci(pairs_intact, 20, groups=groups, n_boot=30)
    assert np.all(seen)


def test_bootstrap_vector_statistic_and_undefined_values():
    y = np.array([0, 1] * 10)
    s = np.linspace(0, 1, 20)
    lo, hi = M.bootstrap_ci(lambda i: [M.auroc(y[i], s[i]), np.nan], 20, n_boot=100)
    assert lo.shape == (2,) and lo[0] <= M.auroc(y, s) <= hi[0]
    assert np.isnan(lo[1]) and np.isnan(hi[1])
