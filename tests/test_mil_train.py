"""Training from the store on generated cohorts with a real signal: learning, attention, survival,
determinism, the run directory, fs eval, fs predict, the CLI and the data layer.

The cohorts are committed through the real write path. A positive slide has a small share of
*signal tiles* whose embeddings are shifted along a fixed direction; everything else is noise.
Mean pooling sees the signal diluted by the bag, attention can find it. (On three generator seeds
ABMIL reached held-out AUROC 0.97-1.00 and mean pooling 0.90-0.95; the survival head's C-index
was 0.75-0.76 against 0.83 for the true hazards.)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import typer
from typer.testing import CliRunner

from featurestore.cli.train import register
from featurestore.distill.data import ArrayBags, BagDataset, BagReader, collate_bags, grid_positions
from featurestore.distill.errors import ConfigError, RunDirError
from featurestore.distill.mil import HeadConfig
from featurestore.distill.predict import predict, read_predictions
from featurestore.distill.report import cached_thumbnails, cell_size, evaluate_run, heatmap_image
from featurestore.distill.runtime import load_checkpoint
from featurestore.distill.schedule import TRAIN, TRAIN_CV, CrossValidation, Schedule
from featurestore.distill.tasks import TaskSpec
from featurestore.distill.train import TrainConfig, cross_validate, fold_metrics, load_cohort, train
from featurestore.schemas import TilingSpec, UnknownEmbeddingSetError
from featurestore.store import SlideCommit, Store, tiles_table
from tests.conftest import commit_random_slide, make_encoder, make_slide

DIM = 16
SHIFT = 4.0
"""Length of the signal shift, in noise standard deviations."""
SHARE = (0.05, 0.15)
"""Share of signal tiles in a positive slide."""
HAZARD = 6.0
"""Log-hazard per unit of signal strength in the survival cohort."""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass(frozen=True)
class Cohort:
    store: Path
    signal: dict[str, np.ndarray]
    labels_csv: Path


def build_cohort(root: Path, kind: str, n_patients: int, *, seed: int = 0) -> Cohort:
    """A store of ``n_patients`` with a learnable signal.

    ``classification``: two slides per patient sharing a label (alternating); positive slides have
    5-15 % signal tiles, grade 1-3 by that share, 0 for negatives. ``survival``: one slide per
    patient, 10-30 % signal tiles shifted by a strength s ~ U(0, 1) times the signal, exponential
    times with log-hazard 6 s, 25 % censored.
    """
    store = Store.create(root / "store")
    tiling = TilingSpec(0.5, 224)
    encoder = make_encoder("synth", DIM)
    rng = np.random.default_rng(seed)
    direction = np.zeros(DIM)
    direction[:4] = SHIFT / 2
    per_patient = 2 if kind == "classification" else 1
    rows, signal = [], {}
    for p in range(n_patients):
        label = p % 2
        months, event = 0.0, 1
        share = rng.uniform(*SHARE) if label else 0.0
        strength = 1.0
        if kind == "survival":
            share, strength = rng.uniform(0.1, 0.3), rng.uniform(0.0, 1.0)
            months = rng.exponential(60 * np.exp(-HAZARD * strength))
            event = int(rng.random() > 0.25)
            months = months if event else months * rng.uniform(0.3, 1.0)
        for k in range(per_patient):
            i = p * per_patient + k
            slide = make_slide(i)
            n = int(rng.integers(40, 90))
            cells = rng.permutation(12 * 12)[:n]
            emb = rng.standard_normal((n, DIM))
            hit = rng.random(n) < share
            if share and not hit.any():
                hit[rng.integers(n)] = True
            emb[hit] += strength * direction
            tiles = tiles_table(slide.slide_id, tiling.id, 1000 + (cells % 12) * 448, 2000 + (cells // 12) * 448,
                                0, 448, np.ones(n))
            store.commit_slide(SlideCommit(slide, tiling, tiles, {encoder: emb.astype(np.float32)}))
            signal[slide.slide_id] = hit
            grade = 0 if not label else 1 + int(share > 0.083) + int(share > 0.117)
            split = "test" if p % 5 == 0 else "val" if p % 5 == 1 else "train"
            rows.append(f"slide_{i}.svs,P{p:03d},{label},{grade},{hit.mean():.4f},{months:.3f},{event},{split}")
    csv = root / "labels.csv"
    csv.write_text("filename,patient,label,grade,share,months,event,split\n" + "\n".join(rows) + "\n")
    store.import_labels(csv)
    return Cohort(root / "store", signal, csv)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Cohort:
    return build_cohort(tmp_path_factory.mktemp("classification"), "classification", 40)


@pytest.fixture(scope="module")
def survival_cohort(tmp_path_factory) -> Cohort:
    return build_cohort(tmp_path_factory.mktemp("survival"), "survival", 100, seed=1)


def config(store: Path, out: Path, head: str = "abmil", task: TaskSpec | None = None, **kw) -> TrainConfig:
    settings = dict(folds=5, epochs=40, patience=10, lr=2e-3, batch_size=4, bootstrap=200, heatmaps=2) | kw
    schedule, cv = ({f.name: settings.pop(f.name) for f in fields(record) if f.name in settings}
                    for record in (Schedule, CrossValidation))
    return TrainConfig(store=store, model="synth", task=task or TaskSpec("classification", "label"), out=out,
                       head=HeadConfig(head, hidden=32, attention_dim=16, heads=4, dropout=0.1),
                       schedule=replace(TRAIN, **schedule), cv=replace(TRAIN_CV, **cv), **settings)


@pytest.fixture(scope="module")
def abmil_run(cohort, tmp_path_factory):
    return train(config(cohort.store, tmp_path_factory.mktemp("runs") / "abmil"))


def test_abmil_learns_the_signal(abmil_run):
    assert abmil_run.metrics["summary"]["auroc"]["pooled"] >= 0.9


@pytest.mark.slow
def test_abmil_matches_or_beats_mean_pooling(abmil_run, cohort, tmp_path):
    mean_run = train(config(cohort.store, tmp_path / "mean", head="mean"))
    abmil = abmil_run.metrics["summary"]["auroc"]
    mean = mean_run.metrics["summary"]["auroc"]
    print(f"\nheld-out AUROC: abmil {abmil['pooled']:.3f} {abmil['ci95']}, mean pooling {mean['pooled']:.3f} "
          f"{mean['ci95']}")
    assert abmil["pooled"] >= mean["pooled"]


def test_attention_mass_on_signal_tiles_exceeds_their_share(abmil_run, cohort):
    predictions = pq.read_table(abmil_run.run_dir / "predictions.parquet").to_pylist()
    store = Store.open(cohort.store, read_only=True)
    reader = BagReader(store, store.embedding_set("synth"))
    ratios = []
    for row in predictions:
        if row["label"] != "1":
            continue
        ck = load_checkpoint(abmil_run.run_dir / "checkpoints" / f"seed{row['seed']}-fold{row['fold']}.pt")
        x = torch.from_numpy(reader.features(row["slide_id"]))[None]
        with torch.no_grad():
            attention = ck.head(x, torch.ones(x.shape[:2], dtype=torch.bool)).attention[0].numpy()
        hit = cohort.signal[row["slide_id"]]
        ratios.append(attention[hit].sum() / hit.mean())
    print(f"\nattention mass / share of signal tiles: median {np.median(ratios):.2f}, min {np.min(ratios):.2f}, "
          f"above 1 for {np.mean(np.array(ratios) > 1):.0%} of {len(ratios)} positive slides")
    assert np.median(ratios) > 2
    assert np.mean(np.array(ratios) > 1) >= 0.9


def test_survival_head_ranks_patients_by_hazard(survival_cohort, tmp_path):
    run = train(config(survival_cohort.store, tmp_path / "cox", task=TaskSpec("survival", "months", event="event"),
                       group=None, batch_size=16, lr=3e-3))
    c_index = run.metrics["summary"]["c_index"]
    print(f"\nheld-out C-index (ABMIL, Cox): {c_index['pooled']:.3f} {c_index['ci95']}")
    assert c_index["pooled"] > 0.7
    assert (run.run_dir / "km.png").is_file()


def test_fixed_seed_reproduces_predictions_exactly(cohort, tmp_path):
    def once(name: str) -> tuple:
        run = train(config(cohort.store, tmp_path / name, folds=3, epochs=4, max_tiles=25, heatmaps=0, bootstrap=0,
                           seeds=2))
        ck = load_checkpoint(run.run_dir / "checkpoints" / "seed1-fold2.pt")
        return pq.read_table(run.run_dir / "predictions.parquet"), ck.head.state_dict()

    (a, state_a), (b, state_b) = once("a"), once("b")
    assert a.num_rows == 2 * 80 and a.equals(b)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_cross_validate_on_bags_in_memory_matches_fs_train_on_the_store(cohort, tmp_path):
    """fs distill's downstream check runs ABMIL on a student's bags held in memory: with the same
    embeddings it must give fs train's predictions exactly (same splits, seeds and initialisation)."""
    cfg = config(cohort.store, tmp_path / "stored", folds=3, epochs=6, max_tiles=25, heatmaps=0, bootstrap=0)
    stored = pq.read_table(train(cfg).run_dir / "predictions.parquet").sort_by([("fold", "ascending"),
                                                                                 ("slide_id", "ascending")])
    store = Store.open(cohort.store, read_only=True)
    reader = BagReader(store, store.embedding_set("synth"))
    in_memory = ArrayBags("copy", {s: reader.features(s) for s in reader.slide_ids},
                          {s: reader.xy(s) for s in reader.slide_ids})
    task, rows = cross_validate(cfg, in_memory, load_cohort(store, in_memory, cfg.task, cfg.schedule.group, None),
                                 torch.device("cpu"))
    rows.sort(key=lambda r: (r["fold"], r["slide_id"]))
    assert [r["slide_id"] for r in rows] == stored.column("slide_id").to_pylist()
    np.testing.assert_array_equal([r["score"] for r in rows], stored.column("score").to_numpy())
    assert fold_metrics(task, rows)["auroc"] > 0.8


def test_run_directory(abmil_run, cohort):
    run = abmil_run.run_dir
    config_json = json.loads((run / "config.json").read_text())
    assert config_json["run_id"] == abmil_run.run_id and config_json["embedding_set"]["encoder_name"] == "synth"
    assert config_json["resolved"]["task"]["classes"] == ["0", "1"] and config_json["task"]["loss"] == "ce"
    assert config_json["cohort"] == {"slides": 80, "patients": 40, "skipped_missing_label": 0, "skipped_unlabelled": 0}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"seed0-fold{f}.pt" for f in range(5)]
    splits = pq.read_table(run / "splits.parquet").to_pylist()
    for fold in range(5):
        roles: dict[str, set] = {"train": set(), "val": set(), "test": set()}
        for row in splits:
            if row["fold"] == fold:
                roles[row["role"]].add(row["group"])
        assert not (roles["train"] & roles["test"] or roles["val"] & roles["test"] or roles["train"] & roles["val"])
    predictions = pq.read_table(run / "predictions.parquet")
    assert predictions.num_rows == 80 and set(predictions.column("slide_id").to_pylist()) == set(cohort.signal)
    metrics = json.loads((run / "metrics.json").read_text())
    auroc = metrics["summary"]["auroc"]
    assert metrics["primary"] == "auroc" and len(metrics["per_fold"]) == 5
    per_fold = [row["auroc"] for row in metrics["per_fold"] if row["auroc"] is not None]
    assert auroc["mean"] == pytest.approx(np.mean(per_fold)) and auroc["sd"] == pytest.approx(np.std(per_fold, ddof=1))
    assert auroc["ci95"][0] <= auroc["pooled"] <= auroc["ci95"][1] and auroc["ci95"][0] < auroc["ci95"][1]
    assert {"balanced_accuracy", "sensitivity_at_specificity_60"} <= set(metrics["summary"])
    assert (run / "roc.png").is_file() and len(list((run / "attention").glob("*.png"))) == 2
    history = pq.read_table(run / "history.parquet")
    assert {"train_loss", "val_loss", "best_epoch"} <= set(history.column_names)
    assert not list(run.parent.glob(".*partial*"))


def test_eval_recomputes_the_metrics(abmil_run):
    before = json.loads((abmil_run.run_dir / "metrics.json").read_text())
    assert evaluate_run(abmil_run.run_dir, n_boot=200) == before


def test_predict_commits_soft_targets_to_the_store(abmil_run, cohort, tmp_path):
    shutil.copytree(cohort.store, tmp_path / "store")
    result = predict(abmil_run.run_dir, tmp_path / "store")
    assert (result.slides, result.rows) == (80, 400)
    store = Store.open(tmp_path / "store")
    table = read_predictions(store, abmil_run.run_id)
    assert table.num_rows == 400 and len(table.column("embedding")[0].as_py()) == 32
    held_out = table.filter(table.column("held_out")).to_pylist()
    assert len(held_out) == 80
    trained = {(r["slide_id"], r["fold"]): r["logits"] for r in
               pq.read_table(abmil_run.run_dir / "predictions.parquet").to_pylist()}
    for row in held_out:
        np.testing.assert_allclose(row["logits"], trained[(row["slide_id"], row["fold"])], atol=1e-5)
    again = predict(abmil_run.run_dir, tmp_path / "store")
    table = read_predictions(store)
    assert table.num_rows == 400 and set(table.column("commit_id").to_pylist()) == {again.commit_id}


def test_predict_needs_the_training_encoder(abmil_run, tmp_path, tiling):
    other = Store.create(tmp_path / "other")
    slide = make_slide(0)
    tiles = tiles_table(slide.slide_id, tiling.id, np.arange(3), np.zeros(3), 0, 448, np.ones(3))
    other.commit_slide(SlideCommit(slide, tiling, tiles, {make_encoder("uni", DIM): np.ones((3, DIM))}))
    with pytest.raises(UnknownEmbeddingSetError, match="fs extract --model synth"):
        predict(abmil_run.run_dir, tmp_path / "other")
    with pytest.raises(RunDirError, match="config.json: not found"):
        predict(tmp_path, tmp_path / "other")


@pytest.mark.parametrize(("task", "head", "expected"), [
    (TaskSpec("ordinal", "grade"), "clam-sb", {"qwk", "auroc_ge1", "sensitivity_at_specificity_60_ge1"}),
    (TaskSpec("regression", "share", loss="huber"), "max", {"pearson", "spearman", "mae"}),
    (TaskSpec("survival", "months", event="event", loss="discrete"), "transmil", {"c_index"}),
])
def test_every_task_runs_end_to_end(cohort, tmp_path, task, head, expected):
    run = train(config(cohort.store, tmp_path / "run", head, task, folds=2, epochs=3, bootstrap=20, heatmaps=1))
    assert expected <= set(run.metrics["summary"])
    assert len(list((run.run_dir / "attention").glob("*.png"))) == 1


def test_fixed_split_column_trains_once_per_seed(cohort, tmp_path):
    run = train(config(cohort.store, tmp_path / "run", split="split", seeds=2, epochs=3, bootstrap=0, heatmaps=0))
    predictions = pq.read_table(run.run_dir / "predictions.parquet")
    assert predictions.num_rows == 2 * 16 and set(predictions.column("fold").to_pylist()) == {0}
    patients = {int(g[1:]) for g in predictions.column("group").to_pylist()}
    assert all(p % 5 == 0 for p in patients)


def test_cohort_problems_are_one_line_errors(cohort, tmp_path):
    with pytest.raises(ConfigError, match="no column 'site'.*--group none"):
        train(config(cohort.store, tmp_path / "a", group="site"))
    with pytest.raises(ConfigError, match="no column 'stage'"):
        train(config(cohort.store, tmp_path / "a", task=TaskSpec("classification", "stage")))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(RunDirError, match="not empty"):
        train(config(cohort.store, tmp_path / "taken"))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(RunDirError, match="a-file: is a file"):
        train(config(cohort.store, tmp_path / "a-file"))
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        config(cohort.store, tmp_path / "a", batch_size=0)


def test_bag_reading(cohort):
    store = Store.open(cohort.store, read_only=True)
    es = store.embedding_set("synth")
    sid = make_slide(3).slide_id
    expected = store.read_bag(es, sid).astype(np.float32)
    for reader in (BagReader(store, es), BagReader(store, es, cache_bytes=1 << 20)):
        np.testing.assert_array_equal(reader.features(sid), expected)
        np.testing.assert_array_equal(reader.features(sid, np.array([0, 5, 7])), expected[[0, 5, 7]])
        np.testing.assert_array_equal(reader.features(sid), expected)
    reader = BagReader(store, es)
    tiles = store.read_tiles(es.tiling_id, sid)
    np.testing.assert_array_equal(reader.xy(sid)[:, 0], tiles.column("x").to_numpy())
    grid = grid_positions(reader.xy(sid))
    assert grid.min() == 0 and grid.max() <= 11

    ids = [make_slide(i).slide_id for i in range(4)]
    ds = BagDataset(reader, ids, np.zeros((4, 2)), max_tiles=20, coords=True, seed=3)
    first = ds[0].features
    assert first.shape == (20, DIM) and torch.equal(ds[0].features, first)
    ds.set_epoch(1)
    assert not torch.equal(ds[0].features, first)
    batch = collate_bags([ds[0], BagDataset(reader, ids, np.zeros((4, 2)), coords=True)[1]])
    n1 = reader.n_tiles(ids[1])
    assert batch.x.shape == (2, max(20, n1), DIM) and batch.mask.sum(1).tolist() == [20, n1]
    assert batch.coords is not None and batch.coords.shape == (2, max(20, n1), 2)


def test_grid_positions_from_strided_coordinates():
    xy = np.array([[1000, 500], [1448, 500], [1000, 948], [2344, 1396]])
    np.testing.assert_array_equal(grid_positions(xy), [[0, 0], [1, 0], [0, 1], [3, 2]])


def test_heatmap_over_cached_tile_pixels(tmp_path, tiling, cohort):
    store = Store.create(tmp_path / "s")
    commit_random_slide(store, 0, tiling, [make_encoder("synth", DIM)], 30, pixels=True)
    es = store.embedding_set("synth")
    sid = make_slide(0).slide_id
    grid = grid_positions(BagReader(store, es).xy(sid))
    cell = cell_size(grid)
    thumbnails = cached_thumbnails(store, sid, es.tiling_id, 30, cell)
    assert thumbnails is not None and thumbnails.shape == (30, cell, cell, 3)
    attention = np.linspace(0, 1, 30)
    over_pixels = np.asarray(heatmap_image(grid, attention, "t", thumbnails))
    silhouette = np.asarray(heatmap_image(grid, attention, "t"))
    assert over_pixels.shape == silhouette.shape and not np.array_equal(over_pixels, silhouette)
    column, band = cell // 2, 28 + cell // 2
    top, bottom = silhouette[band + 29 * cell, column], silhouette[band, column]
    assert top[0] > 200 and top[2] < 150 and bottom[0] < 170
    plain = Store.open(cohort.store, read_only=True)
    assert cached_thumbnails(plain, make_slide(0).slide_id, plain.embedding_set("synth").tiling_id, 5, 4) is None


def test_cli_train_eval_predict(cohort, tmp_path):
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    store = tmp_path / "store"
    shutil.copytree(cohort.store, store)
    out = tmp_path / "run"
    args = ["train", "--store", str(store), "--model", "synth", "--label", "label", "--head", "transmil",
            "--out", str(out), "--folds", "2", "--epochs", "2", "--hidden", "16", "--attention-dim", "8",
            "--attention-heads", "4", "--bootstrap", "20", "--heatmaps", "1", "--max-tiles", "32", "--lr", "0.002"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "auroc" in result.output and "seed 0 fold 1" in result.output and (out / "metrics.json").is_file()

    result = runner.invoke(app, ["eval", str(out), "--bootstrap", "20"])
    assert result.exit_code == 0, result.output
    assert "balanced_accuracy" in result.output

    result = runner.invoke(app, ["predict", str(out), "--store", str(store)])
    assert result.exit_code == 0, result.output
    assert "wrote 160 predictions for 80 slides" in result.output

    result = runner.invoke(app, ["train", "--store", str(store), "--model", "synth", "--label", "stage",
                                 "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2
    assert "no column 'stage'" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["eval", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "not found" in result.output
