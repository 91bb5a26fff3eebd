"""Task losses against hand computations; label encoding, fitting and round trips."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from featurestore.distill.errors import ConfigError
from featurestore.distill.tasks import (
    Classification,
    Ordinal,
    Regression,
    Survival,
    TaskSpec,
    cox_breslow_loss,
    discrete_time_nll,
    make_task,
    task_from_dict,
)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_cox_breslow_loss_by_hand():
    risk = torch.tensor([0.5, -0.2, 1.0, 0.0])
    time = torch.tensor([2.0, 2.0, 1.0, 3.0])
    event = torch.tensor([1.0, 1.0, 0.0, 1.0])
    # Breslow: both events at t=2 share the full risk set {t >= 2} = {0.5, -0.2, 0.0}, tied event included;
    # the event at 3 has only itself; the censored slide at 1 contributes no term and is in no risk set here
    denominator = math.log(math.exp(0.5) + math.exp(-0.2) + math.exp(0.0))
    expected = -((0.5 - denominator) + (-0.2 - denominator) + (0.0 - 0.0)) / 3
    assert float(cox_breslow_loss(risk, time, event)) == pytest.approx(expected, rel=1e-6)


def test_cox_loss_without_events_is_zero_with_gradient():
    risk = torch.tensor([0.3, 0.1], requires_grad=True)
    loss = cox_breslow_loss(risk, torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(risk.grad, torch.zeros(2))


def test_cox_loss_prefers_the_right_ordering():
    time, event = torch.tensor([1.0, 2.0, 3.0]), torch.ones(3)
    assert cox_breslow_loss(torch.tensor([2.0, 1.0, 0.0]), time, event) < \
        cox_breslow_loss(torch.tensor([0.0, 1.0, 2.0]), time, event)


def test_discrete_time_nll_by_hand():
    logits = torch.tensor([[0.3, -0.4, 0.1], [0.2, 0.5, -1.0]])
    interval = torch.tensor([1, 1])
    event = torch.tensor([1.0, 0.0])
    # event in interval 1: survive 0, fail in 1; censored in 1: survive 0 and 1
    a = -math.log(1 - _sig(0.3)) - math.log(_sig(-0.4))
    b = -math.log(1 - _sig(0.2)) - math.log(1 - _sig(0.5))
    assert float(discrete_time_nll(logits, interval, event)) == pytest.approx((a + b) / 2, rel=1e-6)


def test_coral_and_cumulative_losses_by_hand():
    spec = TaskSpec("ordinal", "grade")
    task = Ordinal(spec, (0, 1, 2))
    logits = torch.tensor([[0.2, -0.5]])
    y = torch.tensor([[1.0, 1.0]])
    # CORAL: P(y > 0) should be 1, P(y > 1) should be 0
    assert float(task.loss(logits, y)) == pytest.approx(-math.log(_sig(0.2)) - math.log(1 - _sig(-0.5)), rel=1e-6)
    cumulative = Ordinal(TaskSpec("ordinal", "grade", loss="cumulative"), (0, 1, 2))
    assert float(cumulative.loss(logits, y)) == pytest.approx(-math.log(_sig(0.2) - _sig(-0.5)), rel=1e-6)


def test_ordinal_readouts_are_rank_consistent():
    torch.manual_seed(0)
    for loss in ("coral", "cumulative"):
        task = Ordinal(TaskSpec("ordinal", "grade", loss=loss), (0, 1, 2, 3, 4))
        readout = task.readout(8)
        with torch.no_grad():
            if loss == "coral":
                readout.bias.copy_(torch.tensor([1.0, 0.2, -0.3, -1.5]))
            else:
                readout.gaps.copy_(torch.tensor([0.3, -2.0, 1.0]))
            p_above = torch.sigmoid(readout(torch.randn(16, 8)))
        assert p_above.shape == (16, 4)
        assert torch.all(p_above[:, 1:] <= p_above[:, :-1] + 1e-6)


def test_classification_encoding_weights_and_metrics():
    labels = pa.table({"label": ["tumour", "benign", "tumour", "tumour"]})
    task = make_task(TaskSpec("classification", "label"), labels)
    assert isinstance(task, Classification) and task.classes == ("benign", "tumour")
    y = task.targets(labels)
    np.testing.assert_array_equal(y[:, 0], [1, 0, 1, 1])
    fitted = task.fit(y)
    assert fitted.weights == pytest.approx((4 / (2 * 1), 4 / (2 * 3)))
    weighted = float(fitted.loss(torch.tensor([[0.0, 0.0]] * 4), torch.from_numpy(y).float()))
    assert weighted == pytest.approx(math.log(2))
    m = fitted.metrics(y[:, 0], y[:, 1], np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [1.0, 0.0]]), np.zeros(4))
    # P(tumour) of the tumours .73, .88, .27 vs the benign .27 -> 2.5 of 3 pairs
    assert m["auroc"] == pytest.approx(2.5 / 3) and m["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    assert {"sensitivity_at_specificity_40", "sensitivity_at_specificity_60", "sensitivity_at_specificity_80"} <= set(m)


def test_integral_float_labels_name_the_same_class():
    task = make_task(TaskSpec("classification", "label"), pa.table({"label": [0, 1, 1]}))
    assert task.classes == ("0", "1")
    np.testing.assert_array_equal(task.targets(pa.table({"label": [1.0, 0.0]}))[:, 0], [1, 0])


def test_ordinal_levels_span_min_to_max_and_threshold_metrics():
    labels = pa.table({"grade": [1, 3, 5, 1]})
    task = make_task(TaskSpec("ordinal", "grade", threshold=2), labels)
    assert isinstance(task, Ordinal) and task.levels == (1, 2, 3, 4, 5) and task.n_outputs == 4
    np.testing.assert_array_equal(task.targets(labels)[:, 0], [0, 2, 4, 0])
    outputs = np.array([[-5.0] * 4, [5, 5, -5, -5], [5.0] * 4, [-5.0] * 4])
    m = task.metrics(np.array([0, 2, 4, 0]), np.ones(4), outputs, task.score(outputs))
    assert m["qwk"] == pytest.approx(1.0) and m["auroc_ge2"] == 1.0


def test_survival_fit_cuts_and_risk_score():
    spec = TaskSpec("survival", "months", event="event", loss="discrete", bins=4)
    labels = pa.table({"months": [1.0, 2.0, 3.0, 4.0, 5.0, 9.0], "event": [1, 1, 1, 1, 1, 0]})
    task = make_task(spec, labels).fit(make_task(spec, labels).targets(labels))
    assert isinstance(task, Survival)
    assert task.cuts == pytest.approx(tuple(np.quantile([1, 2, 3, 4, 5], [0.25, 0.5, 0.75])))
    # higher hazards everywhere -> lower survival -> higher risk
    assert task.score(np.array([[2.0] * 4]))[0] > task.score(np.array([[-2.0] * 4]))[0]


def test_regression_standardises_on_the_training_split():
    task = make_task(TaskSpec("regression", "psa"), pa.table({"psa": [1.0, 3.0]}))
    fitted = task.fit(np.array([[1.0, 1.0], [3.0, 1.0]]))
    assert isinstance(fitted, Regression) and (fitted.mean, fitted.sd) == (2.0, 1.0)
    assert fitted.score(np.array([[1.0]]))[0] == 3.0
    assert float(fitted.loss(torch.tensor([[1.0]]), torch.tensor([[3.0, 1.0]]))) == 0.0


@pytest.mark.parametrize("task", [
    Classification(TaskSpec("classification", "label"), ("a", "b"), (0.5, 1.5)),
    Ordinal(TaskSpec("ordinal", "grade", loss="cumulative"), (0, 1, 2)),
    Survival(TaskSpec("survival", "t", event="e", loss="discrete"), (1.0, 2.0, 3.0)),
    Regression(TaskSpec("regression", "v", loss="huber"), 2.0, 3.0),
])
def test_round_trip(task):
    assert task_from_dict(task.to_dict()) == task


@pytest.mark.parametrize(("spec", "match"), [
    (dict(kind="survival", label="t"), "--event"),
    (dict(kind="classification", label="y", loss="cox"), "does not fit"),
    (dict(kind="regression", label="y", event="e"), "only used by survival"),
    (dict(kind="grading", label="y"), "unknown task"),
])
def test_bad_specs_are_refused(spec, match):
    with pytest.raises(ConfigError, match=match):
        TaskSpec(**spec)


def test_bad_labels_are_refused():
    with pytest.raises(ConfigError, match="single class"):
        make_task(TaskSpec("classification", "y"), pa.table({"y": [1, 1]}))
    with pytest.raises(ConfigError, match="integer grades"):
        make_task(TaskSpec("ordinal", "y"), pa.table({"y": [0.5, 1.0, 3.0]}))
    with pytest.raises(ConfigError, match="0 \\(censored\\) or 1"):
        make_task(TaskSpec("survival", "t", event="e"), pa.table({"t": [1.0], "e": [2]})).targets(
            pa.table({"t": [1.0], "e": [2]}))
    with pytest.raises(ConfigError, match="no column 'grade'"):
        make_task(TaskSpec("ordinal", "grade"), pa.table({"y": [1]}))
