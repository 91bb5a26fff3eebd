"""Every distillation objective against a computation done by hand (NumPy, small numbers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from featurestore.distill.errors import ConfigError
from featurestore.distill.kd.objectives import (
    DistributionKD,
    FeatureKD,
    LogitKD,
    MultiTeacherKD,
    ObjectiveConfig,
    RelationalKD,
    SimSiam,
    StudentOutput,
    Supervised,
    Targets,
    XmagKD,
    build_objective,
    region_embeddings,
    relation_map,
)


def identity_(linear: nn.Linear) -> nn.Linear:
    with torch.no_grad():
        linear.weight.copy_(torch.eye(linear.out_features, linear.in_features))
        linear.bias.zero_()
    return linear


def out(embedding: list, feature_map: torch.Tensor | None = None) -> StudentOutput:
    e = torch.tensor(embedding, dtype=torch.float32)
    return StudentOutput(e, feature_map if feature_map is not None else torch.zeros(len(e), 1, 1, 1))


def cos_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_feature_cosine_and_smooth_l1_by_hand():
    kd = FeatureKD(2, "t", 2, ObjectiveConfig(cosine=2.0, smooth_l1=3.0))
    identity_(kd.head)
    terms = kd(out([[1, 0], [0, 2]]), Targets({"t": torch.tensor([[1.0, 1.0], [0.0, 1.0]])}))
    # cosines 1/√2 and 1 → mean(1 − cos) = (1 − 0.70711) / 2; smooth-L1 (β = 1) of |d| = 0, 1, 0, 1 → 0.5 each.
    assert terms["cosine"].item() == pytest.approx(2 * (1 - 2**-0.5) / 2, abs=1e-6)
    assert terms["smooth_l1"].item() == pytest.approx(3 * 0.25, abs=1e-6)
    assert kd.export_projection() is kd.head


def test_multi_teacher_fixed_and_learned_weights_by_hand():
    cfg = ObjectiveConfig(cosine=0.0, smooth_l1=1.0, teacher_weights=(2.0, 1.0))
    kd = MultiTeacherKD(2, {"a": 2, "b": 3}, cfg)
    identity_(kd.heads[0])
    identity_(kd.heads[1])
    s = out([[1.0, 0.0]])
    targets = Targets({"a": torch.tensor([[1.0, 0.5]]), "b": torch.tensor([[1.0, 0.0, 2.0]])})
    terms = kd(s, targets)
    loss_a = (0 + 0.5 * 0.5**2) / 2           # smooth-L1 of d = (0, −0.5)
    loss_b = (0 + 0 + (2 - 0.5)) / 3           # d = (0, 0, −2): |d| ≥ 1 → |d| − 0.5
    assert terms["teacher:a"].item() == pytest.approx(2 * loss_a, abs=1e-6)
    assert terms["teacher:b"].item() == pytest.approx(1 * loss_b, abs=1e-6)
    learned = MultiTeacherKD(2, {"a": 2, "b": 3}, ObjectiveConfig(cosine=0.0, teacher_weights=(2.0, 1.0),
                                                                    learned_weights=True))
    learned.load_state_dict(kd.state_dict() | {"log_vars": torch.tensor([0.5, -0.5])})
    terms = learned(s, targets)
    assert terms["teacher:a"].item() == pytest.approx(2 * (np.exp(-0.5) * loss_a + 0.5), abs=1e-6)
    assert terms["teacher:b"].item() == pytest.approx(np.exp(0.5) * loss_b - 0.5, abs=1e-6)
    assert isinstance(learned.log_vars, nn.Parameter)
    with pytest.raises(ConfigError, match="one per --teacher"):
        MultiTeacherKD(2, {"a": 2, "b": 3}, ObjectiveConfig(teacher_weights=(1.0,)))


@pytest.mark.parametrize("distance", ["cosine", "mse", "cosine+mse"])
def test_xmag_global_mean_of_present_children_and_masked_local_term(distance):
    k, lam = 2, 0.7
    kd = XmagKD(student_dim=2, channels=2, teacher="t", teacher_dim=2, k=k,
                cfg=ObjectiveConfig(xmag_lambda=lam, xmag_distance=distance))
    identity_(kd.head)
    conv = kd.spatial[1]
    with torch.no_grad():
        conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        conv.bias.zero_()
    fmap = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 3.0]]]])  # (1, C=2, 2, 2)
    children = torch.tensor([[[1.0, 0.0], [2.0, 2.0], [9.0, 9.0], [1.0, 2.0]]])  # row-major (0,0) (0,1) (1,0) (1,1)
    mask = torch.tensor([[True, True, False, True]])
    terms = kd(out([[1.0, 1.0]], fmap), Targets({"t": children}, child_mask=mask))

    def dist(z: np.ndarray, t: np.ndarray) -> np.ndarray:
        mse = ((z - t) ** 2).mean(-1)
        cos = 1 - cos_np(z, t)
        return {"cosine": cos, "mse": mse, "cosine+mse": cos + mse}[distance]

    mean_child = np.array([[1 + 2 + 1, 0 + 2 + 2]]) / 3
    assert terms["global"].item() == pytest.approx(dist(np.array([[1.0, 1.0]]), mean_child).mean(), abs=1e-5)
    cells = np.array([[1.0, 0.0], [2.0, 1.0], [0.0, 1.0], [1.0, 3.0]])  # the map's cells, row-major, channels last
    per_child = dist(cells, children[0].numpy())
    assert terms["local"].item() == pytest.approx(lam * per_child[[0, 1, 3]].mean(), abs=1e-5)


def test_relation_map_and_region_pooling_by_hand():
    rel = relation_map(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    np.testing.assert_allclose(rel.numpy(), [[1 / 2**0.5, 1 / 2**0.5], [1 / 5**0.5, 2 / 5**0.5]], atol=1e-6)
    f = torch.tensor([[1.0], [3.0], [5.0], [7.0]])
    regions = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 1], [1, 0, 0]])  # (block, row, col)
    np.testing.assert_allclose(region_embeddings(f, regions, 2).numpy(), [[3.0], [7.0]])
    np.testing.assert_allclose(region_embeddings(f, regions, 1).numpy(), f.numpy())


def test_relational_terms_by_hand_and_gamma_is_a_parameter_starting_at_zero():
    kd = RelationalKD(2, "t", 2, ObjectiveConfig(levels=(1, 2)))
    assert isinstance(kd.gamma, nn.Parameter) and kd.gamma.item() == 0.0
    assert any(p is kd.gamma for p in kd.parameters())
    identity_(kd.head)
    with torch.no_grad():
        kd.gamma.fill_(0.5)
    s = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    t = np.array([[1.0, 2.0], [0.0, 1.0], [2.0, 0.0]])
    regions = torch.tensor([[0, 0, 0], [0, 0, 1], [1, 0, 0]])
    terms = kd(out(s.tolist()), Targets({"t": torch.tensor(t, dtype=torch.float32)}, regions=regions))

    def rmap(f: np.ndarray) -> np.ndarray:
        g = f @ f.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    level1 = ((rmap(s) - rmap(t)) ** 2).mean()
    s2, t2 = np.array([s[:2].mean(0), s[2]]), np.array([t[:2].mean(0), t[2]])  # 2×2 windows: tiles 0+1, tile 2
    level2 = ((rmap(s2) - rmap(t2)) ** 2).mean()
    assert terms["relation"].item() == pytest.approx(0.1 * (level1 + level2) / 2, abs=1e-6)
    assert terms["feature"].item() == pytest.approx(0.05 * ((s - t) ** 2).mean(), abs=1e-6)
    enriched_s, enriched_t = s + 0.5 * rmap(s) @ s / 3, t + 0.5 * rmap(t) @ t / 3
    assert terms["relation_feature"].item() == pytest.approx(0.01 * ((enriched_s - enriched_t) ** 2).mean(), abs=1e-6)
    only_samples = kd(out(s.tolist()), Targets({"t": torch.tensor(t, dtype=torch.float32)}))
    assert only_samples["relation"].item() == pytest.approx(0.1 * level1, abs=1e-6)


def test_hinton_logit_distillation_by_hand():
    alpha, tau = 0.3, 4.0
    kd = LogitKD(3, 3, ObjectiveConfig(alpha=alpha, tau=tau))
    identity_(kd.classifier)  # the student's logits are its embedding
    zs = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 0.0]])
    zt = np.array([[3.0, 0.0, 1.0], [0.0, 0.0, 2.0]])
    labels = torch.tensor([2, -1])
    terms = kd(out(zs.tolist()), Targets({}, labels=labels, logits=torch.tensor(zt, dtype=torch.float32)))

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p_t, p_s = softmax(zt / tau), softmax(zs / tau)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(1).mean()
    ce = -np.log(softmax(zs)[0, 2])  # only the labelled tile
    assert terms["kl"].item() == pytest.approx((1 - alpha) * tau**2 * kl, abs=1e-6)
    assert terms["ce"].item() == pytest.approx(alpha * ce, abs=1e-6)


def test_dino_distribution_matching_by_hand_and_centre_update():
    cfg = ObjectiveConfig(prototypes=3, teacher_temp=0.5, student_temp=0.25, center_momentum=0.9)
    kd = DistributionKD(3, "t", 2, cfg)
    with torch.no_grad():
        kd.prototypes.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2**-0.5, 2**-0.5]]))
        kd.center.copy_(torch.tensor([0.1, 0.0, -0.1]))
    identity_(kd.head)
    t = np.array([[3.0, 4.0], [1.0, 0.0]])
    ls = np.array([[0.2, 0.0, 0.1], [0.0, 0.3, 0.0]])
    kd.train()
    terms = kd(out(ls.tolist()), Targets({"t": torch.tensor(t, dtype=torch.float32)}))

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    protos = np.array([[1, 0], [0, 1], [2**-0.5, 2**-0.5]])
    scores = (t / np.linalg.norm(t, axis=1, keepdims=True)) @ protos.T
    p_t = softmax((scores - np.array([0.1, 0.0, -0.1])) / 0.5)
    ce = -(p_t * np.log(softmax(ls / 0.25))).sum(1).mean()
    assert terms["cross_entropy"].item() == pytest.approx(ce, abs=1e-5)
    np.testing.assert_allclose(kd.center.numpy(), 0.9 * np.array([0.1, 0.0, -0.1]) + 0.1 * scores.mean(0), atol=1e-6)
    kd.eval()
    before = kd.center.clone()
    kd(out(ls.tolist()), Targets({"t": torch.tensor(t, dtype=torch.float32)}))
    assert torch.equal(kd.center, before), "evaluation must not move the centre"


def test_supervised_baseline_ignores_unlabelled_tiles():
    kd = Supervised(2, 2)
    identity_(kd.classifier)
    terms = kd(out([[2.0, 0.0], [0.0, 1.0]]), Targets({}, labels=torch.tensor([0, -1])))
    assert terms["ce"].item() == pytest.approx(-np.log(np.exp(2) / (np.exp(2) + 1)), abs=1e-6)


def test_simsiam_baseline_is_the_negative_symmetric_cosine_with_stop_gradient():
    kd = SimSiam(2)
    kd.projector, kd.predictor = nn.Identity(), nn.Identity()
    s1 = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    s2 = torch.tensor([[1.0, 1.0], [0.0, 1.0]], requires_grad=True)
    view = StudentOutput(s2, torch.zeros(2, 1, 1, 1))
    terms = kd(StudentOutput(s1, torch.zeros(2, 1, 1, 1)), Targets({}, second_view=view))
    assert terms["negative_cosine"].item() == pytest.approx(-np.mean([2**-0.5, 2**-0.5]), abs=1e-6)
    terms["negative_cosine"].backward()
    p = s1.detach().numpy()[0]  # d/dp of −½·cos(p, z) for the first pair, z held fixed
    z = s2.detach().numpy()[0]
    grad = -0.5 / 2 * (z / (np.linalg.norm(p) * np.linalg.norm(z)) - (p @ z) * p / (np.linalg.norm(p) ** 3
                                                                                      * np.linalg.norm(z)))
    np.testing.assert_allclose(s1.grad.numpy()[0], grad, atol=1e-6)


def test_build_objective_refuses_what_does_not_fit():
    dims = {"a": 4}
    with pytest.raises(ConfigError, match="multi-teacher"):
        build_objective("feature", ObjectiveConfig(), student_dim=8, channels=8, teacher_dims={"a": 4, "b": 2},
                        n_classes=2)
    with pytest.raises(ConfigError, match="lower magnification"):
        build_objective("xmag", ObjectiveConfig(), student_dim=8, channels=8, teacher_dims=dims, n_classes=2, k=1)
    with pytest.raises(ConfigError, match="label column"):
        build_objective("logit", ObjectiveConfig(), student_dim=8, channels=8, teacher_dims=dims, n_classes=0)
    with pytest.raises(ConfigError, match="unknown objective"):
        build_objective("crd", ObjectiveConfig(), student_dim=8, channels=8, teacher_dims=dims, n_classes=2)
    with pytest.raises(ConfigError, match="temperatures"):
        ObjectiveConfig(teacher_temp=0.0)
