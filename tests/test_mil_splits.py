"""Splits: no patient in two folds or two roles, even for an adversarial cohort; stratification; fixed splits."""

from __future__ import annotations

import numpy as np
import pytest

from featurestore.distill.errors import ConfigError
from featurestore.distill.splits import assign_folds, column_splits, kfold_splits


def adversarial_cohort() -> tuple[np.ndarray, np.ndarray]:
    """Patients built to tempt a splitter into leaking.

    One patient owns 24 slides (more than a fold's share), several patients have slides with
    different labels, ids differ only by case or whitespace-free look-alikes, positives are rare,
    and singletons fill the rest; slides are shuffled so a patient's slides are never adjacent.
    """
    groups = ["BIG"] * 24 + ["mixed1"] * 3 + ["mixed2"] * 4 + ["P1", "p1", "P01", "P1 "] * 2
    strata = [0] * 20 + [1] * 4 + [0, 1, 1] + [1, 0, 0, 1] + [0, 1, 0, 0] * 2
    for i in range(60):
        groups.append(f"s{i}")
        strata.append(int(i % 7 == 0))
    order = np.random.default_rng(5).permutation(len(groups))
    return np.array(groups)[order], np.array(strata)[order]


def test_no_patient_in_two_folds_or_two_roles():
    groups, strata = adversarial_cohort()
    splits = kfold_splits(groups, strata, folds=5, seeds=3, val_fraction=0.25)
    assert len(splits) == 15
    for seed in range(3):
        of_seed = [s for s in splits if s.seed == seed]
        tests = np.concatenate([s.test for s in of_seed])
        assert np.array_equal(np.sort(tests), np.arange(len(groups)))
        test_fold_of_patient: dict[str, int] = {}
        for sp in of_seed:
            roles = {"train": set(groups[sp.train]), "val": set(groups[sp.val]), "test": set(groups[sp.test])}
            assert not roles["train"] & roles["val"] and not roles["train"] & roles["test"]
            assert not roles["val"] & roles["test"]
            assert len(sp.train) + len(sp.val) + len(sp.test) == len(groups) and len(sp.val) > 0
            for g in roles["test"]:
                assert test_fold_of_patient.setdefault(g, sp.fold) == sp.fold
    assert {"P1", "p1", "P01", "P1 "} <= set(test_fold_of_patient)


def test_folds_are_stratified_and_seeds_reshuffle():
    groups = np.array([f"p{i // 2}" for i in range(100)])
    strata = np.array([int((i // 2) % 5 == 0) for i in range(100)])
    folds = [assign_folds(groups, strata, 5, np.random.default_rng(s)) for s in range(2)]
    for fold_of in folds:
        positives = np.bincount(fold_of[strata == 1], minlength=5)
        sizes = np.bincount(fold_of, minlength=5)
        assert positives.max() - positives.min() <= 2 and sizes.max() - sizes.min() <= 2
    assert not np.array_equal(folds[0], folds[1])
    assert np.array_equal(folds[0], assign_folds(groups, strata, 5, np.random.default_rng(0)))


def test_too_few_patients_for_the_folds():
    with pytest.raises(ConfigError, match="5 folds need at least 5 patients"):
        kfold_splits(np.array(["a", "a", "b", "c", "d"]), np.zeros(5), folds=5, seeds=1)


def test_fixed_split_column():
    groups = np.array(["a", "a", "b", "c", "d", "e", "f", "g"])
    values = ["train", "Train", "train", "train", "train", "VAL", "test", "test"]
    (sp,) = column_splits(values, groups, np.zeros(8), seeds=1, column="split")
    assert (list(sp.train), list(sp.val), list(sp.test)) == ([0, 1, 2, 3, 4], [5], [6, 7])
    no_val = ["train"] * 6 + ["test"] * 2
    splits = column_splits(no_val, groups, np.zeros(8), seeds=2, column="split", val_fraction=0.25)
    for sp in splits:
        assert set(sp.test) == {6, 7} and len(sp.val) > 0
        assert not set(groups[sp.train]) & set(groups[sp.val])


@pytest.mark.parametrize(("values", "match"), [
    (["train", "train", "test", "test"], "patient 'a' in both train and test"),
    (["train", "holdout", "test", "test"], "value 'holdout'"),
    (["train", "train", "train", "train"], "needs both train and test"),
])
def test_bad_split_columns(values, match):
    with pytest.raises(ConfigError, match=match):
        column_splits(values, np.array(["a", "b", "a", "c"]), np.zeros(4), seeds=1, column="split")


def test_tiny_cohorts_still_get_a_validation_patient():
    groups = np.array(["a", "a", "b", "c", "d"])
    splits = kfold_splits(groups, np.array([0, 0, 1, 0, 1]), folds=2, seeds=1, val_fraction=0.2)
    for sp in splits:
        assert len(sp.val) > 0 and not set(groups[sp.val]) & set(groups[sp.train])
    (one,) = column_splits(["train", "train", "test"], np.array(["a", "a", "b"]), np.zeros(3), seeds=1,
                           column="split")
    assert len(one.val) == 0 and list(one.train) == [0, 1]
