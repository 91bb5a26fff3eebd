"""AMKD-style distillation: a pathology + omics survival teacher taught to a pathology-only student.

Teacher (``OmicsGuidedMIL``): tiles are projected and pooled by gated attention (ABMIL); each omics
feature becomes a token (value × learned vector + bias, as in FT-Transformer) that cross-attends
to the tiles ("gene-guided" enhancement); the pooled pathology vector and the mean guided token are
fused into the slide representation, read out as a Cox risk. The guided tokens keep a residual
connection to their omics tokens: attention output alone is a mix of tile values, through which an
omics value could only choose tiles, never contribute its own signal. A missing value is replaced by a
learned *missing token* of its feature, so a patient without omics still gets a risk — from the
tiles through learned queries — and whole-patient omics dropout during training teaches that path.

Student: an ABMIL head (``distill.mil``) on the same bags, trained with Cox + λ·KD, where KD pulls
its batch-standardised risk to the teacher's and its projected slide embedding to the teacher's,
per patient weighted by ``adaptive_weights`` (docs/amkd.md): distillation is reduced where teacher
and student disagree most. λ = 0 is the pathology-only baseline, on identical splits and initialisation.
Every model is trained by ``distill.fit`` and keeps the epoch where its own objective is lowest on the
validation patients, seen together as one batch. For the student that includes KD towards the
teacher's outputs there (the teacher never trained on them), a far steadier guide than the Cox loss of
a dozen patients, which alone let some splits keep epoch 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featurestore.devices import autocast, resolve_device
from featurestore.distill import metrics as M
from featurestore.distill.data import BagBatch, BagDataset, BagReader
from featurestore.distill.errors import ConfigError, require
from featurestore.distill.fit import Loss, fit, head_forward, loss_on
from featurestore.distill.mil import HeadConfig, build_head
from featurestore.distill.mil.base import GatedAttention, HeadOutput, masked_softmax, projection
from featurestore.distill.rundir import staged_run, write_json
from featurestore.distill.runtime import batches, make_loader
from featurestore.distill.schedule import AMKD, AMKD_CV, CrossValidation, Schedule
from featurestore.distill.splits import Split, kfold_splits
from featurestore.distill.tasks import Task, TaskSpec, make_task
from featurestore.distill.train import Cohort, load_cohort
from featurestore.store import Store


def adaptive_weights(student_risk: Tensor, teacher_risk: Tensor, tau: float) -> Tensor:
    """w_i = exp(−d_i² / 2τ²) / mean_j exp(−d_j² / 2τ²), d_i = |ẑ_s,i − ẑ_t,i| on batch-standardised risks.

    No gradient flows through the weights; their batch mean is 1, so λ keeps its scale. See docs/amkd.md.
    """
    d = standardise(student_risk.detach()) - standardise(teacher_risk.detach())
    w = torch.exp(-(d**2) / (2 * tau**2))
    return w / w.mean().clamp_min(1e-12)


def standardise(risk: Tensor) -> Tensor:
    """Cox risks are defined up to a shift and scale: compare them as z-scores within the batch."""
    return (risk - risk.mean()) / risk.std(unbiased=False).clamp_min(1e-6)


def kd_loss(student_risk: Tensor, student_embedding: Tensor, teacher_risk: Tensor, teacher_embedding: Tensor,
            tau: float) -> Tensor:
    """Σ_i w_i [(ẑ_s,i − ẑ_t,i)² + (1 − cos(e_s,i, e_t,i))] / n with the adaptive weights w."""
    w = adaptive_weights(student_risk, teacher_risk, tau)
    risk = (standardise(student_risk) - standardise(teacher_risk)) ** 2
    representation = 1 - F.cosine_similarity(student_embedding, teacher_embedding, dim=-1)
    return (w * (risk + representation)).mean()


class OmicsGuidedMIL(nn.Module):
    """Pathology bag + omics vector → (Cox risk, slide embedding, tile attention); NaN omics are missing."""

    def __init__(self, in_dim: int, n_omics: int, readout: Callable[[int], nn.Module], cfg: HeadConfig,
                 heads: int = 4) -> None:
        super().__init__()
        h = cfg.hidden
        self.embed_dim = h
        self.project = projection(in_dim, cfg)
        self.attention = GatedAttention(h, cfg.attention_dim, cfg.dropout)
        self.value = nn.Parameter(torch.randn(n_omics, h) / h**0.5)
        self.bias = nn.Parameter(torch.zeros(n_omics, h))
        self.missing = nn.Parameter(torch.randn(n_omics, h) / h**0.5)
        self.cross = nn.MultiheadAttention(h, heads, dropout=cfg.dropout, batch_first=True)
        self.fuse = nn.Sequential(nn.Linear(2 * h, h), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.readout = readout(h)

    def forward(self, x: Tensor, mask: Tensor, omics: Tensor) -> HeadOutput:
        tiles = self.project(x)
        a = masked_softmax(self.attention(tiles), mask)
        pathology = torch.einsum("bn,bnd->bd", a, tiles)
        present = ~torch.isnan(omics)[..., None]
        tokens = torch.where(present, torch.nan_to_num(omics)[..., None] * self.value + self.bias, self.missing)
        attended, _ = self.cross(tokens, tiles, tiles, key_padding_mask=~mask, need_weights=False)
        z = self.fuse(torch.cat([pathology, (tokens + attended).mean(1)], -1))
        return HeadOutput(self.readout(z), z, a)


MODELS = ("teacher", "teacher_no_omics", "baseline", "student")
"""What every split trains and scores, in ``AmkdResult``'s order."""


@dataclass(frozen=True)
class AmkdConfig:
    """Survival from ``time`` / ``event`` columns; omics are the labels columns ``omics`` or, with
    ``omics_parquet``, its columns (all but ``omics_key``) joined to slides by ``omics_key``.

    ``weight`` is λ, ``tau`` the disagreement scale of the adaptive weight (in risk standard
    deviations), ``omics_dropout`` the share of training patients whose omics the teacher sees as
    missing, so its fallback is trained. ``schedule`` and ``cv`` (``distill.schedule``) apply to the
    teacher, the baseline and the student alike.
    """

    store: Path
    model: str
    time: str
    event: str
    omics: tuple[str, ...] = ()
    omics_parquet: Path | None = None
    omics_key: str = "patient"
    head: HeadConfig = field(default_factory=lambda: HeadConfig("abmil", hidden=64, attention_dim=32))
    schedule: Schedule = AMKD
    cv: CrossValidation = AMKD_CV
    weight: float = 1.0
    tau: float = 1.0
    omics_dropout: float = 0.25

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", Path(self.store))
        object.__setattr__(self, "omics", tuple(self.omics))
        if not self.omics and self.omics_parquet is None:
            raise ConfigError("the teacher needs omics: pass --omics COLUMN (repeatable) or --omics-parquet FILE")
        require(self.weight >= 0, "weight", "must be >= 0")
        require(self.tau > 0, "tau", "must be > 0")
        require(0 <= self.omics_dropout < 1, "omics_dropout", "must be in [0, 1)")
        self.schedule.require_batch(4, "Cox compares the patients of a batch")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"store": str(self.store), "omics": list(self.omics),
                               "omics_parquet": None if self.omics_parquet is None else str(self.omics_parquet)}


@dataclass(frozen=True, eq=False)
class AmkdResult:
    """Per seed, the C-index on the pooled test folds of: the teacher with omics, the teacher with every
    test patient's omics removed, the pathology-only baseline and the distilled student; ``predictions``
    holds every model's held-out risk per slide (slide_id, group, seed, fold, model, time, event, risk)."""

    teacher: list[float]
    teacher_no_omics: list[float]
    baseline: list[float]
    student: list[float]
    predictions: pa.Table


def read_omics(cfg: AmkdConfig, store: Store, cohort: Cohort) -> np.ndarray:
    """(slides, features) float64 with NaN where a value (or a patient's whole row) is missing."""
    if cfg.omics_parquet is None:
        columns = [c for c in cfg.omics if c not in cohort.labels.column_names]
        if columns:
            raise ConfigError(f"{store.root}: labels have no omics column {columns[0]!r}; import it with "
                              "fs labels import or pass --omics-parquet")
        return np.array([[np.nan if v is None else float(v) for v in cohort.labels.column(c).to_pylist()]
                         for c in cfg.omics], np.float64).T.reshape(len(cohort.slide_ids), len(cfg.omics))
    try:
        table = pq.read_table(cfg.omics_parquet)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{cfg.omics_parquet}: cannot read omics Parquet ({err}); pass a Parquet file") from err
    if cfg.omics_key not in table.column_names or cfg.omics_key not in cohort.labels.column_names:
        raise ConfigError(f"{cfg.omics_parquet}: join column {cfg.omics_key!r} must be in the Parquet file and the "
                          "labels; pass --omics-key")
    features = list(cfg.omics) or [c for c in table.column_names if c != cfg.omics_key]
    keys = [str(k) for k in table.column(cfg.omics_key).to_pylist()]
    values = np.array([[np.nan if v is None else float(v) for v in table.column(c).to_pylist()] for c in features],
                      np.float64).T
    by_key = dict(zip(keys, values, strict=True))
    blank = np.full(len(features), np.nan)
    return np.array([by_key.get(str(k), blank) for k in cohort.labels.column(cfg.omics_key).to_pylist()])


def amkd(cfg: AmkdConfig, out: Path | None = None) -> AmkdResult:
    """Cross-validate teacher, baseline and distilled student on the same patient-grouped splits; with
    ``out``, write the run directory: ``config.json``, ``metrics.json`` (C-index per seed of each model)
    and ``predictions.parquet``."""
    if out is None:
        return _amkd(cfg)
    with staged_run(Path(out)) as staging:
        result = _amkd(cfg)
        c_index = {name: getattr(result, name) for name in MODELS}
        write_json(staging / "config.json", cfg.to_dict())
        write_json(staging / "metrics.json", {"primary": "c_index", "c_index": c_index,
                                              "mean": {name: float(np.nanmean(c)) for name, c in c_index.items()}})
        pq.write_table(result.predictions, staging / "predictions.parquet")
    return result


def _amkd(cfg: AmkdConfig) -> AmkdResult:
    store = Store.open(cfg.store, read_only=True)
    reader = BagReader(store, store.embedding_set(cfg.model), cache_bytes=2**30)
    cohort = load_cohort(store, reader, TaskSpec("survival", cfg.time, event=cfg.event), cfg.schedule.group, None)
    task = make_task(TaskSpec("survival", cfg.time, event=cfg.event), cohort.labels)
    targets = task.targets(cohort.labels)
    omics = read_omics(cfg, store, cohort)
    device = resolve_device(cfg.schedule.device)
    rows: list[dict] = []
    for sp in kfold_splits(cohort.groups, task.strata(targets), cfg.cv.folds, cfg.cv.seeds, cfg.cv.val_fraction):
        for name, risk in _run_split(cfg, sp, task, targets, omics, cohort, reader, device).items():
            rows += [{"slide_id": cohort.slide_ids[r], "group": str(cohort.groups[r]), "seed": sp.seed,
                      "fold": sp.fold, "model": name, "time": float(targets[r, 0]), "event": int(targets[r, 1]),
                      "risk": float(risk[i])} for i, r in enumerate(sp.test)]
    table = pa.Table.from_pylist(rows)
    return AmkdResult(*(_c_per_seed(table.filter(pc.equal(table["model"], name)), cfg.cv.seeds)
                        for name in MODELS), table)


def _c_per_seed(rows: pa.Table, seeds: int) -> list[float]:
    result = []
    for seed in range(seeds):
        mine = rows.filter(pc.equal(rows["seed"], seed))
        result.append(M.c_index(*(mine[c].to_numpy() for c in ("time", "event", "risk"))))
    return result


def _run_split(cfg: AmkdConfig, sp: Split, task: Task, targets: np.ndarray, omics: np.ndarray, cohort: Cohort,
               reader: BagReader, device: torch.device) -> dict[str, np.ndarray]:
    """Each model's risk on the test slides of one (seed, fold), by ``MODELS`` name."""
    seed = 1000 * sp.seed + sp.fold
    fitted = task.fit(targets[sp.train])
    mean = np.nanmean(omics[sp.train], 0)
    sd = np.nanstd(omics[sp.train], 0)
    scaled = torch.from_numpy(((omics - np.nan_to_num(mean)) / np.where(np.nan_to_num(sd) > 0, sd, 1)).astype(
        np.float32))
    ids = cohort.slide_ids
    dim = reader.es.embed_dim

    def dataset(rows: np.ndarray, cap: int | None) -> BagDataset:
        return BagDataset(reader, [ids[r] for r in rows], targets[rows], max_tiles=cap, seed=seed)

    every = np.arange(len(ids))
    train_ds, val_ds = dataset(sp.train, cfg.cv.max_tiles), dataset(sp.val, None) if len(sp.val) else None

    def train(model: nn.Module, loss: Loss) -> None:
        validate = loss_on(loss, val_ds, sp.val, device) if val_ds is not None else None
        fit(model, loss, train_ds, sp.train, validate, cfg.schedule, cfg.cv.patience, device, seed)

    torch.manual_seed(seed)
    teacher = OmicsGuidedMIL(dim, omics.shape[1], fitted.readout, cfg.head).to(device)
    drop = np.random.default_rng(seed)

    def teacher_out(b: BagBatch, rows: np.ndarray, training: bool, with_omics: bool = True) -> HeadOutput:
        o = scaled[rows].clone()
        if training:
            o[torch.from_numpy(drop.random(len(rows)) < cfg.omics_dropout)] = float("nan")
        if not with_omics:
            o[:] = float("nan")
        return teacher(b.x, b.mask, o.to(device))

    train(teacher, Loss(teacher_out, fitted.loss))
    t_risk, t_emb = _outputs(lambda b, rows: teacher_out(b, rows, False), dataset(every, None), every,
                             cfg.schedule.batch_size, device)
    no_omics, _ = _outputs(lambda b, rows: teacher_out(b, rows, False, with_omics=False), dataset(sp.test, None),
                           sp.test, cfg.schedule.batch_size, device)
    result = {"teacher": t_risk[sp.test], "teacher_no_omics": no_omics}
    t_risk_t, t_emb_t = torch.from_numpy(t_risk), torch.from_numpy(t_emb)
    for name, weight in (("baseline", 0.0), ("student", cfg.weight)):
        torch.manual_seed(seed)
        student = build_head(cfg.head, dim, fitted.readout, fitted.n_classes).to(device)
        project = nn.Linear(student.embed_dim, teacher.embed_dim).to(device)

        def distil(out: HeadOutput, b: BagBatch, rows: np.ndarray, project: nn.Module = project) -> Tensor:
            return kd_loss(out.logits[:, 0].float(), project(out.embedding.float()), t_risk_t[rows].to(device),
                           t_emb_t[rows].to(device), cfg.tau)

        forward = head_forward(student, fitted.instance_labels)
        train(nn.ModuleList([student, project]),
              Loss(forward, fitted.loss, student.cfg.instance_weight, distil, weight))
        result[name], _ = _outputs(lambda b, rows, forward=forward: forward(b, rows, False), dataset(sp.test, None),
                                   sp.test, cfg.schedule.batch_size, device)
    return result


@torch.no_grad()
def _outputs(run: Callable[[BagBatch, np.ndarray], HeadOutput], ds: BagDataset, rows: np.ndarray, batch_size: int,
             device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Risk (n,) and embedding (n, E) per dataset item, in dataset order."""
    risk: list[np.ndarray] = []
    emb: list[np.ndarray] = []
    order: list[np.ndarray] = []
    for b in batches(make_loader(ds, batch_size), device):
        with autocast(device):
            out = run(b, rows[b.index.numpy()])
        risk.append(out.logits[:, 0].float().cpu().numpy())
        emb.append(out.embedding.float().cpu().numpy())
        order.append(b.index.numpy())
    position = np.argsort(np.concatenate(order))
    return np.concatenate(risk)[position], np.concatenate(emb)[position]
