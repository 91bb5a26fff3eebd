"""Slide students distilled from another cohort's teacher bank (triplet / CLIP) or from ensemble soft labels.

The student is an ABMIL head (``distill.mil``) on cohort B's cached bags, trained with the task's
loss plus λ times one auxiliary term:

- ``triplet``: anchor = the student's L2-normalised bag embedding, linearly projected to the teacher
  dimension; positive = a bank item of the same label (and secondary bin), negative = an adjacent
  label (|Δ| = ``gap``) or the FAISS-hardest item of another label; cosine distances, ``margin``.
- ``clip``: symmetric InfoNCE between the projected student embeddings of a batch and one
  same-label bank item per bag, at ``temperature``.
- ``soft``: KL to soft targets averaged over K teacher heads (rows of a SQL query per slide).
- ``task``: no auxiliary term, the baseline every other objective is compared with.

Splits, tasks, metrics and the fit loop are ``fs train``'s: patient-grouped stratified folds, early
stopping on the validation *task* loss (the auxiliary term is stochastic), the test fold scored once. Tiles are
z-scored per feature with the training split's tile moments (``standardise``): without it a head on
features with a small spread barely moves in the epochs given, and an auxiliary term only slows it. Every
objective sees the same splits and the same head initialisation for a (seed, fold), so per-seed
differences are paired and a Wilcoxon signed-rank test over seeds applies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor, nn

from featurestore.devices import resolve_device
from featurestore.distill.data import BagBatch, BagDataset, BagReader
from featurestore.distill.errors import ConfigError, require
from featurestore.distill.fit import Loss, fit, head_forward, task_loss_on
from featurestore.distill.mil import HeadConfig, HeadOutput, MILHead, build_head
from featurestore.distill.rundir import staged_run, write_json
from featurestore.distill.runtime import infer, make_loader
from featurestore.distill.schedule import SLIDES, SLIDES_CV, CrossValidation, Schedule
from featurestore.distill.splits import Split, kfold_splits
from featurestore.distill.tasks import Task, TaskSpec, make_task
from featurestore.distill.train import Cohort, load_cohort
from featurestore.distill.xcohort.bank import TeacherBank, TripletSampler, load_bank
from featurestore.distill.xcohort.objectives import ensemble_probabilities, info_nce, soft_target_loss, triplet_loss
from featurestore.store import Store

OBJECTIVES = ("task", "triplet", "clip", "soft")


@dataclass(frozen=True)
class BankSpec:
    """Where the teacher bank comes from: a store (may differ from the student's), a SQL query returning
    ``embedding`` and ``label``, and an optional ``secondary`` column cut at ``edges`` into bins."""

    store: Path
    query: str
    label: str
    secondary: str | None = None
    edges: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", Path(self.store))
        object.__setattr__(self, "edges", tuple(float(e) for e in self.edges))
        if list(self.edges) != sorted(self.edges):
            raise ConfigError(f"bin edges must be increasing, got {list(self.edges)}")


@dataclass(frozen=True)
class SlideDistillConfig:
    """One student objective on one store, cross-validated over ``cv.seeds`` × ``cv.folds``.

    ``weight`` is λ in task + λ·aux. ``anchor_label`` / ``anchor_secondary`` name the student
    store's columns matched against the bank's (default: the bank's names). ``soft_query`` returns
    ``slide_id`` and ``logits`` of K heads per slide (e.g. held-out rows of the ``predictions``
    table); ``soft_temperature`` tempers them. ``standardise`` z-scores tiles with the training
    split's per-feature tile mean and sd.
    """

    store: Path
    model: str
    task: TaskSpec
    objective: str = "triplet"
    bank: BankSpec | None = None
    anchor_label: str | None = None
    anchor_secondary: str | None = None
    soft_query: str | None = None
    soft_temperature: float = 1.0
    weight: float = 1.0
    margin: float = 0.2
    temperature: float = 0.1
    gap: int = 1
    hard_negatives: bool = False
    head: HeadConfig = field(default_factory=lambda: HeadConfig("abmil", hidden=128, attention_dim=64))
    schedule: Schedule = SLIDES
    cv: CrossValidation = SLIDES_CV
    standardise: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", Path(self.store))
        require(self.objective in OBJECTIVES, "objective", f"must be one of {', '.join(OBJECTIVES)}, "
                f"got {self.objective!r}")
        if self.objective in ("triplet", "clip") and self.bank is None:
            raise ConfigError(f"bank is missing: objective {self.objective} needs a teacher bank (store, SQL query "
                              "and label column)", field="bank")
        if self.objective == "soft" and not self.soft_query:
            raise ConfigError("soft_query is missing: objective soft needs a query returning slide_id and logits "
                              "per teacher head", field="soft_query")
        if self.objective == "soft" and self.task.kind != "classification":
            raise ConfigError(f"soft labels distil class probabilities; task {self.task.kind} has none")
        for name in ("weight", "margin"):
            require(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("temperature", "soft_temperature"):
            require(getattr(self, name) > 0, name, "must be > 0")
        self.schedule.require_batch(2, "InfoNCE and Cox compare the bags of a batch")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["store"] = str(self.store)
        if self.bank is not None:
            out["bank"]["store"] = str(self.bank.store)
        return out


@dataclass(frozen=True, eq=False)
class SlideDistillResult:
    """``test`` / ``val``: per seed, the task's metrics on the pooled test folds / pooled validation slides;
    ``predictions``: out-of-fold test rows (slide_id, group, seed, fold, y, event, logits, score)."""

    config: SlideDistillConfig
    primary: str
    test: list[dict[str, float]]
    val: list[dict[str, float]]
    predictions: pa.Table

    def primary_per_seed(self, role: str = "test") -> np.ndarray:
        return np.array([m[self.primary] for m in (self.test if role == "test" else self.val)])


@dataclass(frozen=True, eq=False)
class _Prepared:
    """What every split of every objective shares: read once."""

    cohort: Cohort
    reader: BagReader
    task: Task
    targets: np.ndarray
    splits: list[Split]
    anchors: np.ndarray
    anchor_bins: np.ndarray
    bank: TeacherBank | None
    soft: np.ndarray | None
    tile_sums: _TileSums | None


@dataclass(frozen=True)
class _TileSums:
    """Per-slide tile count, sum and sum of squares (float64, aligned with the cohort's slides): the
    tile moments of any split without holding its tiles together or reading the bags again."""

    n: np.ndarray
    total: np.ndarray
    squares: np.ndarray

    @classmethod
    def read(cls, reader: BagReader, slide_ids: list[str]) -> _TileSums:
        n, total, squares = [], [], []
        for sid in slide_ids:
            tiles = reader.features(sid).astype(np.float64)
            n.append(len(tiles))
            total.append(tiles.sum(0))
            squares.append((tiles**2).sum(0))
        return cls(np.array(n), np.stack(total), np.stack(squares))

    def moments(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature mean and sd (floored at 1e-6) of the tiles of slides ``rows``, as float32."""
        count = self.n[rows].sum()
        mean = self.total[rows].sum(0) / count
        sd = np.sqrt(np.maximum(self.squares[rows].sum(0) / count - mean**2, 0.0))
        return mean.astype(np.float32), np.maximum(sd, 1e-6).astype(np.float32)


def distill_slides(cfg: SlideDistillConfig, out: Path | None = None) -> SlideDistillResult:
    """Cross-validate the configured student; with ``out``, write the run directory ``write_run`` describes."""
    if out is None:
        return _run(cfg, _prepare(cfg))
    with staged_run(Path(out)) as staging:
        result = _run(cfg, _prepare(cfg))
        _write(result, staging)
    return result


def compare_objectives(cfg: SlideDistillConfig, objectives: tuple[str, ...] = ("task", "triplet", "clip")
                       ) -> dict[str, SlideDistillResult]:
    """The same splits and initialisations for each objective; data are read once."""
    prepared = _prepare(replace(cfg, objective=next(o for o in objectives if o != "task")))
    return {o: _run(replace(cfg, objective=o), prepared) for o in objectives}


def wilcoxon_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided exact Wilcoxon signed-rank p-value of paired per-seed metrics (NaN when all equal)."""
    if np.allclose(a, b):
        return float("nan")
    return float(stats.wilcoxon(a, b, alternative="two-sided").pvalue)


def sweep(cfg: SlideDistillConfig, margins: tuple[float, ...], weights: tuple[float, ...]) -> list[dict[str, float]]:
    """Mean validation primary metric for every (margin, λ); the test folds take no part in the choice."""
    prepared = _prepare(cfg)
    rows = []
    for margin in margins:
        for weight in weights:
            result = _run(replace(cfg, margin=margin, weight=weight), prepared)
            rows.append({"margin": margin, "weight": weight, f"val_{result.primary}":
                         float(np.nanmean(result.primary_per_seed("val")))})
    return rows


def _prepare(cfg: SlideDistillConfig) -> _Prepared:
    store = Store.open(cfg.store, read_only=True)
    reader = BagReader(store, store.embedding_set(cfg.model), cache_bytes=2**30)
    cohort = load_cohort(store, reader, cfg.task, cfg.schedule.group, None)
    bank = anchors = bins = soft = None
    if cfg.objective in ("triplet", "clip") and cfg.bank is not None:
        bank = load_bank(Store.open(cfg.bank.store, read_only=True), cfg.bank.query, cfg.bank.label,
                         secondary=cfg.bank.secondary, edges=cfg.bank.edges)
        anchor_label = cfg.anchor_label or cfg.bank.label
        anchors = _column(cohort, anchor_label, store).astype(np.int64)
        bins = np.zeros(len(anchors), np.int64)
        secondary = cfg.anchor_secondary or cfg.bank.secondary
        if secondary:
            bins = np.digitize(_column(cohort, secondary, store), cfg.bank.edges)
        TripletSampler(bank, gap=cfg.gap).check_labels(anchors)
    if cfg.objective == "soft" and cfg.soft_query:
        soft = _soft_targets(store, cfg.soft_query, cohort.slide_ids, cfg.soft_temperature)
    task = make_task(cfg.task, cohort.labels)
    targets = task.targets(cohort.labels)
    splits = kfold_splits(cohort.groups, task.strata(targets), cfg.cv.folds, cfg.cv.seeds, cfg.cv.val_fraction)
    n = len(cohort.slide_ids)
    return _Prepared(cohort, reader, task, targets, splits,
                     anchors if anchors is not None else np.zeros(n, np.int64),
                     bins if bins is not None else np.zeros(n, np.int64), bank, soft,
                     _TileSums.read(reader, cohort.slide_ids) if cfg.standardise else None)


def _column(cohort: Cohort, name: str, store: Store) -> np.ndarray:
    if name not in cohort.labels.column_names:
        raise ConfigError(f"{store.root}: labels have no column {name!r}; import it or pass --anchor-label")
    values = cohort.labels.column(name).to_pylist()
    if any(v is None for v in values):
        raise ConfigError(f"{store.root}: column {name!r} has missing values on labelled slides; fill them in")
    return np.asarray(values, np.float64)


def _soft_targets(store: Store, query: str, slide_ids: list[str], temperature: float) -> np.ndarray:
    """Average the K heads' rows per slide into probabilities; every cohort slide needs K rows."""
    table = store.sql(query)
    if not {"slide_id", "logits"} <= set(table.column_names):
        raise ConfigError(f"{store.root}: the soft-label query must return slide_id and logits, it returns "
                          f"{', '.join(table.column_names)}")
    rows: dict[str, list[list[float]]] = {}
    for sid, logits in zip(table.column("slide_id").to_pylist(), table.column("logits").to_pylist(), strict=True):
        rows.setdefault(sid, []).append(logits)
    missing = [s for s in slide_ids if s not in rows]
    if missing:
        raise ConfigError(f"{store.root}: the soft-label query has no logits for slide {missing[0]} "
                          f"({len(missing)} slides); run fs predict on this store or filter the cohort")
    counts = {len(rows[s]) for s in slide_ids}
    if len(counts) != 1:
        raise ConfigError(f"{store.root}: slides have different numbers of teacher heads {sorted(counts)}; "
                          "filter the query to one row per head and slide")
    logits = torch.tensor(np.array([rows[s] for s in slide_ids], np.float32)).transpose(0, 1)
    return ensemble_probabilities(logits, temperature).numpy()


def _run(cfg: SlideDistillConfig, prep: _Prepared) -> SlideDistillResult:
    device = resolve_device(cfg.schedule.device)
    test_rows: list[dict] = []
    val_rows: list[dict] = []
    for sp in prep.splits:
        test, val = _run_split(cfg, prep, sp, device)
        test_rows += test
        val_rows += val
    return SlideDistillResult(cfg, prep.task.primary, _per_seed(prep.task, test_rows, cfg.cv.seeds),
                              _per_seed(prep.task, val_rows, cfg.cv.seeds), pa.Table.from_pylist(test_rows))


def _per_seed(task: Task, rows: list[dict], seeds: int) -> list[dict[str, float]]:
    out = []
    for seed in range(seeds):
        mine = [r for r in rows if r["seed"] == seed]
        if not mine:
            out.append({task.primary: float("nan")})
            continue
        y, event = np.array([r["y"] for r in mine]), np.array([r["event"] for r in mine])
        logits = np.array([r["logits"] for r in mine], np.float64)
        out.append(task.metrics(y, event, logits, np.array([r["score"] for r in mine])))
    return out


class _Aux(nn.Module):
    """The auxiliary term and its projection head (student embedding → teacher dimension)."""

    def __init__(self, cfg: SlideDistillConfig, prep: _Prepared, embed_dim: int, seed: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.prep = prep
        self.rng = np.random.default_rng(seed)
        self.project: nn.Module | None = None
        self.sampler: TripletSampler | None = None
        if prep.bank is not None and cfg.objective in ("triplet", "clip"):
            self.project = nn.Linear(embed_dim, prep.bank.dim)
            self.sampler = TripletSampler(prep.bank, gap=cfg.gap, hard=cfg.hard_negatives)
            self.register_buffer("bank", torch.from_numpy(prep.bank.embeddings), persistent=False)

    def forward(self, embedding: Tensor, logits: Tensor, index: np.ndarray) -> Tensor:
        cfg, prep = self.cfg, self.prep
        if cfg.objective == "soft" and prep.soft is not None:
            targets = torch.from_numpy(prep.soft[index]).to(logits.device)
            return soft_target_loss(logits, targets, cfg.soft_temperature)
        assert self.project is not None and self.sampler is not None, "bank objectives build a projection"
        anchor = self.project(F.normalize(embedding, dim=-1))
        labels, bins = prep.anchors[index], prep.anchor_bins[index]
        positive = self.bank[torch.from_numpy(self.sampler.positives(labels, bins, self.rng)).to(anchor.device)]
        if cfg.objective == "clip":
            return info_nce(anchor, positive, cfg.temperature)
        negatives = self.sampler.negatives(labels, self.rng, anchor.detach().float().cpu().numpy())
        negative = self.bank[torch.from_numpy(negatives).to(anchor.device)]
        return triplet_loss(anchor, positive, negative, cfg.margin)


def _run_split(cfg: SlideDistillConfig, prep: _Prepared, sp: Split,
               device: torch.device) -> tuple[list[dict], list[dict]]:
    seed = 1000 * sp.seed + sp.fold
    torch.manual_seed(seed)
    task = prep.task.fit(prep.targets[sp.train])
    head = build_head(cfg.head, prep.reader.es.embed_dim, task.readout, task.n_classes)
    if cfg.standardise:
        head = _Standardised(head, *prep.tile_sums.moments(sp.train))
    head = head.to(device)
    aux = _Aux(cfg, prep, head.embed_dim, seed).to(device)
    ids = prep.cohort.slide_ids
    batch_size = cfg.schedule.batch_size

    def dataset(rows: np.ndarray, cap: int | None) -> BagDataset:
        return BagDataset(prep.reader, [ids[r] for r in rows], prep.targets[rows], max_tiles=cap, seed=seed)

    def aux_term(out: HeadOutput, batch: BagBatch, rows: np.ndarray) -> Tensor:
        return aux(out.embedding.float(), out.logits.float(), rows)

    val_ds = dataset(sp.val, None) if len(sp.val) else None
    validate = task_loss_on(head, task.loss, val_ds, batch_size, device) if val_ds is not None else None
    loss = Loss(head_forward(head, task.instance_labels), task.loss, head.cfg.instance_weight,
                aux_term if cfg.objective != "task" else None, cfg.weight)
    fit(nn.ModuleList([head, aux]), loss, dataset(sp.train, cfg.cv.max_tiles), sp.train, validate, cfg.schedule,
        cfg.cv.patience, device, seed)
    test = _score_rows(head, task, prep, sp, sp.test, dataset(sp.test, None), batch_size, device)
    val = _score_rows(head, task, prep, sp, sp.val, val_ds, batch_size, device) if val_ds is not None else []
    return test, val


class _Standardised(nn.Module):
    """A MIL head whose tiles are z-scored per feature with the training split's tile moments.

    Frozen encoders' features can sit far from zero with a tiny spread (the tiny CNN's vary by ~0.02
    around 0.05), so a default-initialised head sees almost no signal and learns slowly."""

    def __init__(self, head: MILHead, mean: np.ndarray, sd: np.ndarray) -> None:
        super().__init__()
        self.head = head
        self.cfg, self.embed_dim = head.cfg, head.embed_dim
        self.register_buffer("mean", torch.from_numpy(mean))
        self.register_buffer("sd", torch.from_numpy(sd))

    def forward(self, x: Tensor, mask: Tensor, *args: Any) -> Any:
        return self.head((x - self.mean) / self.sd, mask, *args)


def _score_rows(head: MILHead | _Standardised, task: Task, prep: _Prepared, sp: Split, rows: np.ndarray,
                ds: BagDataset, batch_size: int, device: torch.device) -> list[dict]:
    outputs = infer(head, make_loader(ds, batch_size), device).outputs
    scores = task.score(outputs)
    return [{"slide_id": prep.cohort.slide_ids[r], "group": str(prep.cohort.groups[r]), "seed": sp.seed,
             "fold": sp.fold, "y": float(prep.targets[r, 0]), "event": int(prep.targets[r, 1]),
             "logits": outputs[i].tolist(), "score": float(scores[i])} for i, r in enumerate(rows)]


def write_run(result: SlideDistillResult, out: Path) -> None:
    """Run directory ``out``: ``config.json``, ``metrics.json`` (per-seed test and validation metrics) and
    ``predictions.parquet`` (the out-of-fold test rows)."""
    with staged_run(Path(out)) as staging:
        _write(result, staging)


def _write(result: SlideDistillResult, run_dir: Path) -> None:
    write_json(run_dir / "config.json", result.config.to_dict())
    write_json(run_dir / "metrics.json", {"primary": result.primary, "test": result.test, "val": result.val,
                                          "mean": {result.primary: float(np.nanmean(result.primary_per_seed()))}})
    pq.write_table(result.predictions, run_dir / "predictions.parquet")
