"""Unit checks of the cross-cohort pieces against hand computations: triplet sampling, the losses,
the adaptive AMKD weight, ensemble averaging and abstention calibration."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from featurestore.distill.errors import ConfigError
from featurestore.distill.mil import HeadConfig
from featurestore.distill.xcohort import (
    OmicsGuidedMIL,
    TeacherBank,
    TripletSampler,
    adaptive_weights,
    calibrate_abstention,
    ensemble_predictions,
    ensemble_probabilities,
    info_nce,
    kd_loss,
    soft_target_loss,
    triplet_loss,
)


def bank(labels: list[int], bins: list[int] | None = None, dim: int = 8, seed: int = 0) -> TeacherBank:
    rng = np.random.default_rng(seed)
    return TeacherBank(rng.standard_normal((len(labels), dim)).astype(np.float32), np.array(labels),
                       np.array(bins if bins is not None else [0] * len(labels)))


def test_bank_is_normalised():
    b = bank([0, 1, 2])
    assert np.allclose(np.linalg.norm(b.embeddings, axis=1), 1, atol=1e-6)


def test_positives_share_label_and_bin_and_negatives_are_adjacent():
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 5, 5]
    bins = [0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 0, 1]
    b = bank(labels, bins)
    sampler = TripletSampler(b)
    rng = np.random.default_rng(0)
    anchors = np.array([0, 1, 2, 3, 5] * 40)
    anchor_bins = np.array([0, 1] * 100)
    pos = sampler.positives(anchors, anchor_bins, rng)
    assert (b.labels[pos] == anchors).all() and (b.bins[pos] == anchor_bins).all()
    neg = sampler.negatives(anchors, rng)
    delta = np.abs(b.labels[neg] - anchors)
    assert (delta[anchors != 5] == 1).all()
    assert set(b.labels[neg][anchors == 5].tolist()) == {3}, "no grade 4 or 6: the nearest label (3) is used"
    assert set(b.labels[neg][anchors == 1].tolist()) == {0, 2}, "both neighbours are drawn"
    assert sampler.negative_labels(5) == [3]


def test_empty_bin_falls_back_to_label_and_gap_two():
    b = bank([0, 0, 2, 2, 4], [0, 0, 0, 0, 0])
    rng = np.random.default_rng(1)
    pos = TripletSampler(b).positives(np.array([2, 2]), np.array([3, 3]), rng)
    assert (b.labels[pos] == 2).all()
    neg = TripletSampler(b, gap=2).negatives(np.array([2] * 50), rng)
    assert set(b.labels[neg].tolist()) == {0, 4}


def test_hard_negative_is_the_most_similar_item_of_another_label():
    emb = np.array([[1, 0], [0.9, 0.1], [0.6, 0.8], [0, 1], [-1, 0]], np.float32)
    b = TeacherBank(emb, np.array([0, 0, 1, 1, 2]), np.zeros(5, np.int64))
    sampler = TripletSampler(b, hard=True)
    anchors = np.array([[1.0, 0.05], [0.0, 1.0]], np.float32)
    neg = sampler.negatives(np.array([0, 1]), np.random.default_rng(0), anchors)
    assert neg.tolist() == [2, 1]


def test_sampler_refuses_labels_missing_from_the_bank():
    with pytest.raises(ConfigError, match="no item with label 7"):
        TripletSampler(bank([0, 1])).check_labels(np.array([0, 7]))


def test_triplet_loss_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    n = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # d(a,p) = 1 - 1/√2 and d(a,n) = 0 for the first; d(a,p) = 0 and d(a,n) = 1 for the second.
    expected = (max(0, 1 - 1 / math.sqrt(2) - 0 + 0.2) + max(0, 0 - 1 + 0.2)) / 2
    assert triplet_loss(a, p, n, 0.2).item() == pytest.approx(expected, abs=1e-6)


def test_info_nce_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    t = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    tau = 0.5
    sn = s.numpy() / np.linalg.norm(s.numpy(), axis=1, keepdims=True)
    tn = t.numpy() / np.linalg.norm(t.numpy(), axis=1, keepdims=True)
    sim = sn @ tn.T / tau

    def ce(logits: np.ndarray) -> float:
        return float(np.mean([-logits[i, i] + np.log(np.exp(logits[i]).sum()) for i in range(len(logits))]))

    assert info_nce(s, t, tau).item() == pytest.approx((ce(sim) + ce(sim.T)) / 2, abs=1e-5)


def test_adaptive_weight_formula():
    student = torch.tensor([0.0, 1.0, 2.0, 3.0])
    teacher = torch.tensor([0.0, 1.0, 2.0, -3.0])
    zs = (student - student.mean()) / student.std(unbiased=False)
    zt = (teacher - teacher.mean()) / teacher.std(unbiased=False)
    raw = torch.exp(-((zs - zt) ** 2) / 2 / 0.5**2)
    w = adaptive_weights(student, teacher, tau=0.5)
    assert torch.allclose(w, raw / raw.mean(), atol=1e-6)
    assert w.mean().item() == pytest.approx(1.0)
    assert w.argmin().item() == 3, "the patient where they disagree most is distilled least"
    same = adaptive_weights(student, 3 * student + 7, tau=0.5)
    assert torch.allclose(same, torch.ones(4)), "scale and shift of a Cox risk do not count as disagreement"


def test_kd_loss_has_no_gradient_through_the_weights():
    s = torch.tensor([0.0, 1.0, 5.0], requires_grad=True)
    t = torch.tensor([0.0, 1.0, -5.0])
    e = torch.ones(3, 4)
    loss = kd_loss(s, e, t, e, tau=1.0)
    loss.backward()
    w = adaptive_weights(s, t, 1.0)
    zs, zt = (s - s.mean()) / s.std(unbiased=False), (t - t.mean()) / t.std(unbiased=False)
    assert loss.item() == pytest.approx((w * (zs - zt) ** 2).mean().item(), abs=1e-6)
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_teacher_falls_back_to_missing_tokens():
    torch.manual_seed(0)
    teacher = OmicsGuidedMIL(6, 3, lambda d: torch.nn.Linear(d, 1), HeadConfig("abmil", 16, 8, dropout=0.0)).eval()
    x, mask = torch.randn(2, 5, 6), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    full = teacher(x, mask, torch.randn(2, 3))
    none = teacher(x, mask, torch.full((2, 3), float("nan")))
    part = teacher(x, mask, torch.tensor([[0.5, float("nan"), 1.0], [float("nan")] * 3]))
    for out in (full, none, part):
        assert torch.isfinite(out.logits).all() and out.logits.shape == (2, 1)
    assert torch.allclose(part.logits[1], none.logits[1])
    assert not torch.allclose(full.logits, none.logits)


def test_ensemble_averages_probabilities_not_logits():
    logits = torch.tensor([[[4.0, 0.0]], [[0.0, 0.0]], [[-2.0, 0.0]]])
    p = [torch.softmax(logits[k, 0], 0) for k in range(3)]
    expected = (p[0] + p[1] + p[2]) / 3
    assert torch.allclose(ensemble_probabilities(logits)[0], expected)
    table = pa.table({"slide_id": ["b", "a", "b", "a"], "logits": [[0.0, 2.0], [1.0, 0.0], [0.0, 0.0], [3.0, 0.0]]})
    ids, probs, k = ensemble_predictions(table)
    assert ids == ["a", "b"] and k == 2
    assert np.allclose(probs[1], (torch.softmax(torch.tensor([0.0, 2.0]), 0) + 0.5).numpy() / 2)


def test_soft_target_loss_is_zero_at_the_targets():
    targets = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    assert soft_target_loss(2 * torch.log(targets), targets, 2.0).item() == pytest.approx(0.0, abs=1e-5)
    assert soft_target_loss(torch.zeros(2, 2), targets).item() > 0


def test_abstention_takes_the_lowest_threshold_reaching_the_target():
    conf = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6])
    probs = np.stack([conf, 1 - conf], 1)
    y = np.array([0, 0, 0, 1, 0, 1])  # answers sorted by confidence: right, right, right, wrong, right, wrong
    cal = calibrate_abstention(probs, y, 0.8)
    assert cal.threshold == pytest.approx(0.7) and cal.val_accuracy == pytest.approx(0.8)
    assert cal.val_coverage == pytest.approx(5 / 6)
    assert calibrate_abstention(probs, y, 1.0).threshold == pytest.approx(0.85)
    assert calibrate_abstention(np.array([[0.6, 0.4]]), np.array([1]), 0.9).threshold == math.inf
    coverage, accuracy = cal.evaluate(np.array([[0.9, 0.1], [0.55, 0.45], [0.2, 0.8]]), np.array([0, 0, 0]))
    assert coverage == pytest.approx(2 / 3) and accuracy == pytest.approx(0.5)
