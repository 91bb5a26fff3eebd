"""Comparing heads: DeLong's test against hand-computed placement values, the paired report on prediction
tables of every task kind, refusals, and one fast cohort on which attention must beat mean pooling."""

from __future__ import annotations

import inspect
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from scipy import stats
from typer.testing import CliRunner

from benchmarks.study_heads import MODEL, CohortSpec, generate
from featurestore.cli.train import register, train_command
from featurestore.distill import metrics as M
from featurestore.distill.compare import check_heads, check_splits, compare, compare_predictions, holm, markdown
from featurestore.distill.errors import ConfigError
from featurestore.distill.mil import HeadConfig
from featurestore.distill.report import PREDICTIONS_SCHEMA
from featurestore.distill.schedule import TRAIN, TRAIN_CV
from featurestore.distill.splits import kfold_splits
from featurestore.distill.tasks import TaskSpec, make_task
from featurestore.distill.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_delong_variance_and_covariance_equal_the_hand_computed_placements():
    y = np.array([1, 1, 1, 0, 0])
    a = np.array([0.9, 0.6, 0.4, 0.5, 0.3])
    b = np.array([0.8, 0.2, 0.7, 0.7, 0.1])
    # a: positives outrank 1, 1, 1/2 of the negatives; negatives are outranked by 2/3 and 1 of the positives.
    # b: positives 1, 1/2, 3/4 (0.7 ties 0.7); negatives outranked by 1/2 (0.8, half of 0.7) and 1.
    v10 = np.array([[1, 1, 0.5], [1, 0.5, 0.75]])
    v01 = np.array([[2 / 3, 1], [0.5, 1]])
    aucs, cov = M.delong(y, np.stack([a, b]))
    np.testing.assert_allclose(aucs, [2.5 / 3, 2.25 / 3])
    np.testing.assert_allclose(aucs, [M.auroc(y, a), M.auroc(y, b)])
    np.testing.assert_allclose(cov, np.cov(v10) / 3 + np.cov(v01) / 2)
    assert cov[0, 0] == pytest.approx(0.08333333 / 3 + 0.05555556 / 2)
    diff, se, p = M.delong_paired(y, a, b)
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    assert diff == pytest.approx(0.25 / 3) and se == pytest.approx(np.sqrt(var))
    assert p == pytest.approx(2 * stats.norm.sf(diff / se))


def test_delong_on_many_ties_matches_the_quadratic_definition():
    rng = np.random.default_rng(3)
    y = rng.random(60) < 0.4
    scores = np.round(rng.normal(y[None] * [[1.0], [0.5]], 1.0), 1)

    def placements(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        psi = (s[y][:, None] > s[~y][None]) + 0.5 * (s[y][:, None] == s[~y][None])
        return psi.mean(1), psi.mean(0)

    (p0, n0), (p1, n1) = placements(scores[0]), placements(scores[1])
    expected = np.cov(np.stack([p0, p1])) / y.sum() + np.cov(np.stack([n0, n1])) / (~y).sum()
    aucs, cov = M.delong(y, scores)
    np.testing.assert_allclose(aucs, [p0.mean(), p1.mean()])
    np.testing.assert_allclose(cov, expected)
    assert np.isnan(M.delong_paired(y, scores[0], scores[0])[2])
    assert np.isnan(M.delong([1, 0, 0], [[0.1, 0.2, 0.3]])[0][0])


def test_holm_steps_down_and_keeps_nan():
    assert holm([0.01, 0.04, float("nan"), 0.03]) == pytest.approx([0.03, 0.06, float("nan"), 0.06], nan_ok=True)


def _table(y: np.ndarray, event: np.ndarray, scores: np.ndarray, logits: np.ndarray, folds: int = 4,
           seeds: int = 2) -> pa.Table:
    n = y.size
    rows = [{"slide_id": f"s{i:03d}", "group": f"p{i // 2:03d}", "seed": s, "fold": (i // 2 + s) % folds,
             "label": str(int(y[i])), "y": float(y[i]), "event": int(event[i]), "logits": logits[s, i].tolist(),
             "score": float(scores[s, i])} for s in range(seeds) for i in range(n)]
    return pa.Table.from_pylist(rows, schema=PREDICTIONS_SCHEMA)


def test_a_clearly_better_head_is_told_apart_and_a_copy_is_not():
    rng = np.random.default_rng(0)
    y = np.arange(120) % 2
    ones = np.ones(120)
    good = y + rng.normal(0, 0.5, (2, 120))
    weak = y + rng.normal(0, 3.0, (2, 120))
    task = make_task(TaskSpec("classification", "label"), pa.table({"label": [str(v) for v in y]}))
    tables = {name: _table(y, ones, s, np.stack([-s, s], -1)) for name, s in
              (("mean", weak), ("abmil", good), ("max", weak))}
    result = compare_predictions(task, tables, n_boot=150)
    pairs = {(r["a"], r["b"]): r for r in result["pairs"]}
    assert pairs[("mean", "abmil")]["told_apart"] and pairs[("mean", "abmil")]["delong_p_holm"] < 0.001
    assert pairs[("mean", "abmil")]["ci95"][1] < 0 and pairs[("mean", "abmil")]["wins_b"] == 8
    assert not pairs[("mean", "max")]["told_apart"]
    assert pairs[("mean", "max")]["difference"] == 0 and pairs[("mean", "max")]["wilcoxon_p"] == 1.0
    assert result["recommendation"].startswith("abmil (auroc")
    assert "| mean − abmil |" in markdown(result) and "nested" in result["selection"]

    tied = compare_predictions(task, {"abmil": tables["mean"], "mean": tables["max"]}, n_boot=100)
    assert "cannot tell" in tied["recommendation"] and "mean" in tied["recommendation"].split("Prefer")[-1]


@pytest.mark.parametrize(("spec", "primary"), [
    (TaskSpec("ordinal", "label"), "qwk"),
    (TaskSpec("survival", "label", event="event"), "c_index"),
    (TaskSpec("regression", "label"), "pearson"),
])
def test_every_task_kind_is_compared_on_its_primary_metric_without_delong(spec, primary):
    rng = np.random.default_rng(1)
    n = 80
    y = np.arange(n) % 3 if spec.kind == "ordinal" else rng.exponential(10, n)
    event = (rng.random(n) < 0.7).astype(int) if spec.kind == "survival" else np.ones(n, int)
    labels = pa.table({"label": [str(v) if spec.kind == "ordinal" else float(v) for v in y], "event": event})
    task = make_task(spec, labels)
    sign = -1 if spec.kind == "survival" else 1
    close = sign * y + rng.normal(0, 0.3, (2, n)) * y.std()
    far = sign * y + rng.normal(0, 3.0, (2, n)) * y.std()
    outputs = task.n_outputs if hasattr(task, "n_outputs") else 1

    def logits(s: np.ndarray) -> np.ndarray:
        if spec.kind != "ordinal":
            return s[..., None].repeat(outputs, -1)
        return np.stack([(s - k - 0.5) for k in range(outputs)], -1)

    targets = task.targets(labels)
    result = compare_predictions(task, {"mean": _table(targets[:, 0], event, far, logits(far)),
                                        "abmil": _table(targets[:, 0], event, close, logits(close))}, n_boot=200)
    (pair,) = result["pairs"]
    assert result["primary"] == primary and result["tests"] == ["wilcoxon_p"] and "delong_p" not in pair
    assert result["heads"]["abmil"]["pooled"] > result["heads"]["mean"]["pooled"]
    assert pair["ci95"][1] < 0 and pair["wilcoxon_p"] < 0.05


def test_heads_and_splits_that_cannot_be_compared_are_refused():
    labels = pa.table({"label": [str(i % 2) for i in range(40)], "months": [1.0] * 40, "event": [0] * 40})
    task = make_task(TaskSpec("classification", "label"), labels)
    survival = make_task(TaskSpec("survival", "months", event="event"), labels)
    with pytest.raises(ConfigError, match="at least two heads"):
        check_heads(["abmil"], task)
    with pytest.raises(ConfigError, match="twice"):
        check_heads(["abmil", "mean", "abmil"], task)
    with pytest.raises(ConfigError, match="clam-sb has no instance loss for a survival task.*drop it"):
        check_heads(["mean", "clam-sb"], survival)
    groups = np.array([f"p{i}" for i in range(40)])
    targets = task.targets(labels)
    with pytest.raises(ConfigError, match="5 folds x 1 seeds give 5 paired results.*pass --seeds 2"):
        check_splits(kfold_splits(groups, task.strata(targets), 5, 1, 0.2), task, targets)
    one_positive = np.r_[np.ones(1), np.zeros(39)]
    with pytest.raises(ConfigError, match="one class only.*lower --folds"):
        check_splits(kfold_splits(groups, one_positive, 3, 2, 0.2), task,
                     np.stack([one_positive, np.ones(40)], 1))
    with pytest.raises(ConfigError, match="no event among its test slides"):
        check_splits(kfold_splits(groups, np.zeros(40), 3, 2, 0.2), survival, survival.targets(labels))
    splits = kfold_splits(groups, task.strata(targets), 3, 2, 0.2)
    other = pa.Table.from_pylist([{"slide_id": "x", "group": "g", "seed": 0, "fold": 0, "label": "1", "y": 1.0,
                                   "event": 1, "logits": [0.0, 1.0], "score": 1.0}], schema=PREDICTIONS_SCHEMA)
    rows = _table(targets[:, 0], targets[:, 1], np.zeros((2, 40)), np.zeros((2, 40, 2)))
    with pytest.raises(ConfigError, match="not run on the same splits and labels.*same --label"):
        compare_predictions(task, {"mean": rows, "abmil": other})
    assert len(splits) == 6


@pytest.fixture(scope="module")
def local_cohort(tmp_path_factory) -> Path:
    """A few strongly shifted tiles per positive slide in bags whose tissue mix varies: the signal is local."""
    spec = CohortSpec(60, "local", strength=8.0, foci=(3, 6), flip=0.1, tiles=(30, 60), dim=32, seed=0)
    return generate(tmp_path_factory.mktemp("local"), spec)


def test_attention_beats_mean_pooling_at_the_defaults_on_a_local_signal(local_cohort, tmp_path):
    """At fs train's defaults (AUROC when written: abmil 0.891, mean pooling 0.818)."""
    cfg = TrainConfig(store=local_cohort, model=MODEL, task=TaskSpec("classification", "label"), out=tmp_path / "c",
                      schedule=replace(TRAIN, device="cpu"), cv=replace(TRAIN_CV, folds=3, seeds=2), bootstrap=200,
                      heatmaps=0)
    result = compare(cfg, [HeadConfig("mean"), HeadConfig("abmil")])
    mean, abmil = result["heads"]["mean"]["pooled"], result["heads"]["abmil"]["pooled"]
    print(f"\nheld-out AUROC at the defaults: abmil {abmil:.3f}, mean pooling {mean:.3f}; {result['recommendation']}")
    assert abmil > mean and abmil >= 0.85
    written = json.loads((tmp_path / "c" / "comparison.json").read_text())
    assert written["heads"] == result["heads"] and (tmp_path / "c" / "comparison.md").is_file()
    assert {"head", "seed", "fold", "slide_id"} <= set(
        pq.read_table(tmp_path / "c" / "predictions.parquet").column_names)


def test_cli_compare_refuses_in_one_line_and_writes_the_report(local_cohort, tmp_path):
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    base = ["train", "--store", str(local_cohort), "-m", MODEL, "--label", "label"]
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "a"), "--head", "mean,abmil"])
    assert result.exit_code == 2 and "pass --compare" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "b"), "--head", "mean,abmil", "--compare",
                                      "--folds", "3"])
    assert result.exit_code == 2 and "pass --seeds 2" in result.output
    assert not (tmp_path / "b").exists()
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "c"), "--head", "mean,max", "--compare",
                                      "--folds", "3", "--seeds", "2", "--epochs", "2", "--bootstrap", "20"])
    assert result.exit_code == 0, result.output
    assert "Recommendation" in result.output and "| mean − max |" in (tmp_path / "c" / "comparison.md").read_text()


def test_cli_head_defaults_are_the_librarys():
    params = inspect.signature(train_command).parameters
    head = HeadConfig()
    assert params["head"].default == head.name
    for flag, name in (("hidden", "hidden"), ("attention_dim", "attention_dim"), ("dropout", "dropout"),
                       ("attention_heads", "heads"), ("landmarks", "landmarks"), ("k_sample", "k_sample"),
                       ("instance_weight", "instance_weight")):
        assert params[flag].default == getattr(head, name), flag
    assert params["window"].default == TRAIN_CV.window
