"""``fs train`` as a Python API: cross-validated MIL heads on cached bags, written to a run directory.

For every (seed, fold): fit the task on the training slides (class weights, bins, scaling), train
a fresh head (``distill.fit``: AdamW, the weights of the epoch with the lowest validation task loss,
early stopping with patience), and score the test fold once with them. The test fold is never used
for any choice. The run directory is written by ``distill.rundir``: whole or not at all.
"""

from __future__ import annotations

import platform
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from featurestore.devices import amp_dtype, resolve_device
from featurestore.distill import report
from featurestore.distill.data import BagDataset, BagReader, BagSource, open_bags, source_record
from featurestore.distill.errors import ConfigError, require
from featurestore.distill.fit import Loss, fit, head_forward, task_loss_on
from featurestore.distill.mil import HeadConfig, build_head
from featurestore.distill.rundir import staged_run, write_json
from featurestore.distill.runtime import infer, make_loader, save_checkpoint
from featurestore.distill.schedule import TRAIN, TRAIN_CV, CrossValidation, Schedule
from featurestore.distill.splits import Split, column_splits, kfold_splits
from featurestore.distill.tasks import Task, TaskSpec, make_task
from featurestore.store import Store

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``fs train`` accepts; the resolved copy is saved as ``RUN_DIR/config.json``.

    ``schedule`` and ``cv`` (``distill.schedule``) say how heads are trained and cross-validated;
    ``schedule.group`` keeps a patient's slides together. ``split`` names a fixed train/val/test column
    used instead of k-fold. ``cache_gb`` bounds the in-memory cache of decoded bags (per loader
    worker); 0 reads every bag from the store every time.
    """

    store: Path
    model: str
    task: TaskSpec
    out: Path
    head: HeadConfig = field(default_factory=HeadConfig)
    schedule: Schedule = TRAIN
    cv: CrossValidation = TRAIN_CV
    split: str | None = None
    workers: int = 0
    cache_gb: float = 2.0
    bootstrap: int = 1000
    heatmaps: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", Path(self.store))
        object.__setattr__(self, "out", Path(self.out))
        for name in ("workers", "cache_gb", "bootstrap", "heatmaps"):
            require(getattr(self, name) >= 0, name, "must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return out | {"store": str(self.store.resolve()), "out": str(self.out.resolve()),
                      "task": asdict(self.task), "head": asdict(self.head), "schedule": asdict(self.schedule),
                      "cv": asdict(self.cv)}


@dataclass(frozen=True, eq=False)
class Cohort:
    """Labelled slides with embeddings, sorted by slide id; ``labels`` rows align with ``slide_ids``."""

    slide_ids: list[str]
    groups: np.ndarray
    labels: pa.Table
    missing_label: int
    unlabelled: int


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    run_id: str
    metrics: dict[str, Any]


def load_cohort(store: Store, reader: BagSource, spec: TaskSpec, group: str | None, split: str | None) -> Cohort:
    """Slides that have embeddings and every label the task needs; a missing group value is an error."""
    labels = store.sql("SELECT * EXCLUDE (commit_id) FROM labels ORDER BY slide_id")
    for name in [*spec.columns, *(c for c in (group, split) if c)]:
        if name not in labels.column_names:
            fix = "import it with fs labels import" + (", or pass --group none to split by slide"
                                                       if name == group else "")
            raise ConfigError(f"{store.root}: labels have no column {name!r} (columns: "
                              f"{', '.join(labels.column_names[1:]) or 'none'}); {fix}")
    with_bags = set(reader.slide_ids)
    labelled = labels.column("slide_id").to_pylist()
    in_set = np.array([s in with_bags for s in labelled], bool)
    complete = np.ones(labels.num_rows, bool)
    for name in spec.columns:
        complete &= np.array([v is not None for v in labels.column(name).to_pylist()], bool)
    labels = labels.filter(pa.array(in_set & complete))
    if labels.num_rows == 0:
        raise ConfigError(f"{store.root}: no slide has both {reader.name} embeddings and "
                          f"{' and '.join(spec.columns)} labels; run fs extract / fs labels import first")
    slide_ids = labels.column("slide_id").to_pylist()
    if group:
        values = labels.column(group).to_pylist()
        empty = [s for s, v in zip(slide_ids, values, strict=True) if v is None or str(v).strip() == ""]
        if empty:
            raise ConfigError(f"{store.root}: {len(empty)} slides have no {group!r} value (e.g. {empty[0]}); "
                              "fill it in the labels CSV, or pass --group none to split by slide")
        groups = np.array([str(v) for v in values])
    else:
        groups = np.array(slide_ids)
    return Cohort(slide_ids, groups, labels, int((in_set & ~complete).sum()), len(with_bags - set(labelled)))


def train(cfg: TrainConfig, on_progress: Progress | None = None) -> RunResult:
    """Cross-validate a head as configured and write the run directory ``cfg.out``."""
    say = on_progress or (lambda _: None)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    with staged_run(cfg.out, run_id) as staging:
        store = Store.open(cfg.store, read_only=True)
        reader = open_bags(store, cfg.model, cache_bytes=int(cfg.cache_gb * 2**30))
        cohort = load_cohort(store, reader, cfg.task, cfg.schedule.group, cfg.split)
        task = make_task(cfg.task, cohort.labels)
        targets = task.targets(cohort.labels)
        splits = make_splits(cfg, cohort, task, targets)
        device = resolve_device(cfg.schedule.device)
        say(f"{len(cohort.slide_ids)} slides, {len(set(cohort.groups))} patients, {len(splits)} splits on {device}"
            + (f"; skipped {cohort.missing_label} slides without labels" if cohort.missing_label else ""))
        (staging / "checkpoints").mkdir()
        write_json(staging / "config.json", _resolved_config(cfg, run_id, reader, task, cohort, device))
        pq.write_table(splits_table(splits, cohort), staging / "splits.parquet")
        predictions, history = [], []
        for sp in splits:
            rows, hist, best_epoch = run_split(sp, cfg, task, targets, cohort, reader, device,
                                                staging / "checkpoints")
            predictions += rows
            history += hist
            metric = fold_metrics(task, rows)[task.primary]
            say(f"seed {sp.seed} fold {sp.fold}: {len(sp.train)}/{len(sp.val)}/{len(sp.test)} slides, "
                f"best epoch {best_epoch}, test {task.primary} {metric:.3f}")
        table = pa.Table.from_pylist(predictions, schema=report.PREDICTIONS_SCHEMA)
        pq.write_table(table, staging / "predictions.parquet")
        pq.write_table(pa.Table.from_pylist(history), staging / "history.parquet")
        metrics = report.write_report(staging, task, table, n_boot=cfg.bootstrap)
        if cfg.heatmaps and isinstance(reader, BagReader):
            report.attention_heatmaps(staging, store, reader, task, table, cfg.heatmaps, device)
    return RunResult(cfg.out, run_id, metrics)


def cross_validate(cfg: TrainConfig, reader: BagSource, cohort: Cohort,
                   device: torch.device) -> tuple[Task, list[dict]]:
    """The test-fold predictions of ``cfg``'s splits, with no run directory: compares several
    embeddings of one cohort under identical splits, seeds and head initialisations (fs distill's
    downstream check of a student against its teacher)."""
    task = make_task(cfg.task, cohort.labels)
    targets = task.targets(cohort.labels)
    rows: list[dict] = []
    for sp in make_splits(cfg, cohort, task, targets):
        rows += run_split(sp, cfg, task, targets, cohort, reader, device, None)[0]
    return task, rows


def fold_metrics(task: Task, rows: list[dict]) -> dict[str, float]:
    """The task's metrics on prediction rows pooled over their folds."""
    return task.metrics(*_arrays(rows))


def make_splits(cfg: TrainConfig, cohort: Cohort, task: Task, targets: np.ndarray) -> list[Split]:
    strata, cv = task.strata(targets), cfg.cv
    if cfg.split:
        return column_splits(cohort.labels.column(cfg.split).to_pylist(), cohort.groups, strata, cv.seeds,
                             column=cfg.split, val_fraction=cv.val_fraction)
    return kfold_splits(cohort.groups, strata, cv.folds, cv.seeds, cv.val_fraction)


def run_split(sp: Split, cfg: TrainConfig, task: Task, targets: np.ndarray, cohort: Cohort, reader: BagSource,
               device: torch.device, checkpoints: Path | None) -> tuple[list[dict], list[dict], int]:
    """Test-fold prediction rows, per-epoch history rows and the kept epoch of one (seed, fold)."""
    seed = 1000 * sp.seed + sp.fold
    torch.manual_seed(seed)
    fitted = task.fit(targets[sp.train])
    head = build_head(cfg.head, reader.dim, fitted.readout, fitted.n_classes).to(device)
    ids = cohort.slide_ids
    batch_size = cfg.schedule.batch_size

    def dataset(rows: np.ndarray, cap: int | None) -> BagDataset:
        return BagDataset(reader, [ids[r] for r in rows], targets[rows], max_tiles=cap, coords=head.needs_coords,
                          seed=seed)

    validate = (task_loss_on(head, fitted.loss, dataset(sp.val, None), batch_size, device, cfg.workers)
                if len(sp.val) else None)
    loss = Loss(head_forward(head, fitted.instance_labels), fitted.loss, head.cfg.instance_weight)
    result = fit(head, loss, dataset(sp.train, cfg.cv.max_tiles), sp.train, validate, cfg.schedule,
                 cfg.cv.patience, device, seed, cfg.workers, cfg.cv.window)
    if checkpoints is not None:
        save_checkpoint(checkpoints / f"seed{sp.seed}-fold{sp.fold}.pt", head, fitted, in_dim=reader.dim,
                        seed=sp.seed, fold=sp.fold, best_epoch=result.best_epoch, train=[ids[r] for r in sp.train],
                        val=[ids[r] for r in sp.val], test=[ids[r] for r in sp.test])
    outputs = infer(head, make_loader(dataset(sp.test, None), batch_size, workers=cfg.workers), device).outputs
    scores = fitted.score(outputs)
    labels = cohort.labels.column(cfg.task.label).to_pylist()
    rows = [{"slide_id": ids[r], "group": str(cohort.groups[r]), "seed": sp.seed, "fold": sp.fold,
             "label": str(labels[r]), "y": float(targets[r, 0]), "event": int(targets[r, 1]),
             "logits": outputs[i].tolist(), "score": float(scores[i])} for i, r in enumerate(sp.test)]
    history = [h | {"seed": sp.seed, "fold": sp.fold, "best_epoch": result.best_epoch} for h in result.history]
    return rows, history, result.best_epoch


def _arrays(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (np.array([r["y"] for r in rows]), np.array([r["event"] for r in rows]),
            np.array([r["logits"] for r in rows], np.float64), np.array([r["score"] for r in rows]))


def splits_table(splits: list[Split], cohort: Cohort) -> pa.Table:
    rows = []
    for sp in splits:
        for role, idx in (("train", sp.train), ("val", sp.val), ("test", sp.test)):
            rows += [{"seed": sp.seed, "fold": sp.fold, "slide_id": cohort.slide_ids[i],
                      "group": str(cohort.groups[i]), "role": role} for i in idx]
    return pa.Table.from_pylist(rows)


def _resolved_config(cfg: TrainConfig, run_id: str, reader: BagSource, task: Task, cohort: Cohort,
                     device: torch.device) -> dict[str, Any]:
    return {
        "run_id": run_id, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **cfg.to_dict(),
        "resolved": {"device": str(device), "amp": str(amp_dtype(device)).removeprefix("torch."),
                     "landmarks": cfg.head.landmarks or cfg.head.hidden // 2, "task": task.to_dict(),
                     "primary_metric": task.primary},
        "embedding_set": source_record(reader),
        "cohort": {"slides": len(cohort.slide_ids), "patients": len(set(cohort.groups.tolist())),
                   "skipped_missing_label": cohort.missing_label,
                   "skipped_unlabelled": cohort.unlabelled},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
    }
