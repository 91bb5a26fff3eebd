"""The student evaluation's pieces against hand computations: cosines, grouped folds, the probe's
cross-validated regularisation."""

from __future__ import annotations

import numpy as np

from featurestore.distill.kd import evaluate as E


def test_cosines_raw_centred_and_of_the_mean_predictor():
    teacher = np.array([[1.0, 0.0], [0.0, 1.0]])
    mean = np.array([0.5, 0.5])
    same = E.cosine_to_teacher(teacher, teacher, mean)
    assert np.isclose(same.mean, 1.0) and np.isclose(same.centred, 1.0)
    assert np.isclose(same.mean_baseline, np.sqrt(0.5))
    flipped = E.cosine_to_teacher(teacher[::-1].copy(), teacher, mean)
    assert np.isclose(flipped.mean, 0.0) and np.isclose(flipped.centred, -1.0)


def test_grouped_folds_keep_slides_whole_and_every_class_in_training():
    groups = np.repeat(np.array(["a", "b", "c", "d", "e", "f"]), 5)
    y = np.repeat(np.array([0, 0, 0, 1, 1, 1]), 5)
    folds = E.grouped_folds(groups, y, k=3)
    assert len(folds) == 3 and np.all(np.sum(folds, 0) == 1)
    for val in folds:
        assert all(len(set(val[groups == g])) == 1 for g in np.unique(groups))
        assert set(y[~val]) == {0, 1}


def test_probe_regularisation_is_chosen_by_cross_validation():
    """Few tiles and many noise dimensions need a strong penalty; a clean low-dimensional signal a weak one."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(6), 10)
    y = np.repeat(np.array([0, 1, 0, 1, 0, 1]), 10)
    noisy = rng.standard_normal((60, 400))
    noisy[:, 0] += 0.8 * y
    assert E.choose_weight_decay(noisy, y, groups) >= 10
    clean = rng.standard_normal((60, 2)) * 0.3
    clean[:, 0] += 3 * y
    assert E.choose_weight_decay(clean, y, groups) <= 0.1
    scores = E.probe_scores(clean, y, groups, clean, y)
    assert scores["metrics"]["linear_auroc"] == 1.0 and scores["metrics"]["linear_weight_decay"] <= 0.1
