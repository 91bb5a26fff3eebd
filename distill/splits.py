"""Cross-validation splits: stratified, grouped by patient, with an inner validation split.

A patient's slides always land in the same fold, and within a fold in the same role (train,
validation or test), so no test slide shares a patient with a slide the model learned from or was
selected on. Folds are balanced on the task's strata (class, grade, event) the way
scikit-learn's StratifiedGroupKFold does it: patients are placed one at a time, largest first,
into the fold that keeps per-stratum proportions most even. Each seed reshuffles the placement,
so several seeds give repeated cross-validation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featurestore.distill.errors import ConfigError

ROLES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
"""Accepted values of a fixed split column (case-insensitive)."""


@dataclass(frozen=True, eq=False)
class Split:
    """One (seed, fold): cohort row indices for training, model selection and testing."""

    seed: int
    fold: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def assign_folds(groups: np.ndarray, strata: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Fold (0..k−1) of every slide; all slides of a group share one fold."""
    names, group_of = np.unique(groups, return_inverse=True)
    if names.size < k:
        raise ConfigError(f"{k} folds need at least {k} patients (groups), the cohort has {names.size}; "
                          "lower --folds")
    _, stratum_of = np.unique(strata, return_inverse=True)
    counts = np.zeros((names.size, stratum_of.max() + 1))
    np.add.at(counts, (group_of, stratum_of), 1)
    totals = counts.sum(0)
    shuffled = rng.permutation(names.size)
    order = shuffled[np.argsort(-counts[shuffled].sum(1), kind="stable")]
    fold_counts = np.zeros((k, counts.shape[1]))
    fold_of_group = np.empty(names.size, int)
    eye = np.eye(k)[:, :, None]
    for g in order:
        trial = fold_counts[None] + eye * counts[g]
        imbalance = (trial / totals).std(1).mean(1)
        best = np.lexsort((np.arange(k), fold_counts.sum(1), np.round(imbalance, 12)))[0]
        fold_counts[best] += counts[g]
        fold_of_group[g] = best
    return fold_of_group[group_of]


def _inner(rows: np.ndarray, groups: np.ndarray, strata: np.ndarray, val_fraction: float,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rows`` into (train, val) by patient; no validation when ``val_fraction`` is 0 or only one
    patient is left. Tiny cohorts get one patient's share rather than an error."""
    patients = np.unique(groups[rows]).size
    if val_fraction == 0 or patients < 2:
        return rows, rows[:0]
    k = min(max(2, round(1 / val_fraction)), patients)
    fold = assign_folds(groups[rows], strata[rows], k, rng)
    return rows[fold != 0], rows[fold == 0]


def kfold_splits(groups: np.ndarray, strata: np.ndarray, folds: int, seeds: int,
                 val_fraction: float = 0.2) -> list[Split]:
    """``folds``-fold grouped, stratified splits for seeds 0..seeds−1."""
    if folds < 2:
        raise ConfigError(f"folds must be >= 2, got {folds}; use a split column for a single train/test split",
                          field="folds")
    groups, strata = np.asarray(groups), np.asarray(strata)
    out = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        fold_of = assign_folds(groups, strata, folds, rng)
        for fold in range(folds):
            train, val = _inner(np.flatnonzero(fold_of != fold), groups, strata, val_fraction, rng)
            out.append(Split(seed, fold, train, val, np.flatnonzero(fold_of == fold)))
    return out


def column_splits(values: list, groups: np.ndarray, strata: np.ndarray, seeds: int, *, column: str,
                  val_fraction: float = 0.2) -> list[Split]:
    """One split per seed from a fixed split column (train / val / test); without val rows the
    validation set is drawn from train by patient. A patient in two roles is refused."""
    groups, strata = np.asarray(groups), np.asarray(strata)
    roles = []
    for v in values:
        role = ROLES.get(str(v).strip().lower()) if v is not None else None
        if role is None:
            raise ConfigError(f"split column {column!r} has value {v!r}; use train, val or test for every slide")
        roles.append(role)
    roles_arr = np.array(roles)
    for a, b in (("train", "test"), ("val", "test"), ("train", "val")):
        shared = set(groups[roles_arr == a]) & set(groups[roles_arr == b])
        if shared:
            raise ConfigError(f"split column {column!r} puts patient {str(sorted(shared)[0])!r} in both {a} and {b}; "
                              "keep each patient's slides in one role")
    if not (roles_arr == "train").any() or not (roles_arr == "test").any():
        raise ConfigError(f"split column {column!r} needs both train and test slides")
    out = []
    for seed in range(seeds):
        if (roles_arr == "val").any():
            train, val = np.flatnonzero(roles_arr == "train"), np.flatnonzero(roles_arr == "val")
        else:
            train, val = _inner(np.flatnonzero(roles_arr == "train"), groups, strata, val_fraction,
                                np.random.default_rng(seed))
        out.append(Split(seed, 0, train, val, np.flatnonzero(roles_arr == "test")))
    return out
