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
Every model keeps the epoch where its own objective is lowest on the validation patients. For the
student that includes KD towards the teacher's outputs there (the teacher never trained on them), a
far steadier guide than the Cox loss of a dozen patients, which alone let some splits keep epoch 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featurestore.distill import metrics as M
from featurestore.distill.data import BagBatch, BagDataset, BagReader
from featurestore.distill.errors import ConfigError
from featurestore.distill.mil import HeadConfig, build_head
from featurestore.distill.mil.base import GatedAttention, HeadOutput, masked_softmax, projection
from featurestore.distill.runtime import batches, make_loader, resolve_device
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


@dataclass(frozen=True)
class AmkdConfig:
    """Survival from ``time`` / ``event`` columns; omics are the labels columns ``omics`` or, with
    ``omics_parquet``, its columns (all but ``omics_key``) joined to slides by ``omics_key``.

    ``weight`` is λ, ``tau`` the disagreement scale of the adaptive weight (in risk standard
    deviations), ``omics_dropout`` the share of training patients whose omics the teacher sees as
    missing, so its fallback is trained.
    """

    store: Path
    model: str
    time: str
    event: str
    omics: tuple[str, ...] = ()
    omics_parquet: Path | None = None
    omics_key: str = "patient"
    head: HeadConfig = field(default_factory=lambda: HeadConfig("abmil", hidden=64, attention_dim=32))
    folds: int = 3
    seeds: int = 1
    group: str | None = "patient"
    val_fraction: float = 0.2
    epochs: int = 40
    patience: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 16
    max_tiles: int | None = 256
    weight: float = 1.0
    tau: float = 1.0
    omics_dropout: float = 0.25
    device: str = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", Path(self.store))
        object.__setattr__(self, "omics", tuple(self.omics))
        if not self.omics and self.omics_parquet is None:
            raise ConfigError("the teacher needs omics: pass --omics COLUMN (repeatable) or --omics-parquet FILE")
        checks = [(self.weight >= 0, "--weight must be >= 0"), (self.tau > 0, "--tau must be > 0"),
                  (0 <= self.omics_dropout < 1, "--omics-dropout must be in [0, 1)"),
                  (self.batch_size >= 4, "--batch-size must be >= 4 (Cox compares patients in a batch)"),
                  (self.seeds >= 1 and self.epochs >= 1 and self.patience >= 1, "seeds, epochs, patience >= 1")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass(frozen=True, eq=False)
class AmkdResult:
    """Per seed, the C-index on the pooled test folds of: the teacher with omics, the teacher with every
    test patient's omics removed, the pathology-only baseline and the distilled student."""

    teacher: list[float]
    teacher_no_omics: list[float]
    baseline: list[float]
    student: list[float]


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


def amkd(cfg: AmkdConfig) -> AmkdResult:
    """Cross-validate teacher, baseline and distilled student on the same patient-grouped splits."""
    store = Store.open(cfg.store, read_only=True)
    reader = BagReader(store, store.embedding_set(cfg.model), cache_bytes=2**30)
    cohort = load_cohort(store, reader, TaskSpec("survival", cfg.time, event=cfg.event), cfg.group, None)
    task = make_task(TaskSpec("survival", cfg.time, event=cfg.event), cohort.labels)
    targets = task.targets(cohort.labels)
    omics = read_omics(cfg, store, cohort)
    device = resolve_device(cfg.device)
    out: dict[str, list[np.ndarray]] = {"teacher": [], "teacher_no_omics": [], "baseline": [], "student": []}
    splits = kfold_splits(cohort.groups, task.strata(targets), cfg.folds, cfg.seeds, cfg.val_fraction)
    for sp in splits:
        risks = _run_split(cfg, sp, task, targets, omics, cohort, reader, device)
        for name, r in risks.items():
            out[name].append(np.stack([sp.test.astype(np.float64), np.full(len(r), sp.seed), r], 1))
    return AmkdResult(*(_c_per_seed(np.concatenate(out[k]), targets, cfg.seeds)
                        for k in ("teacher", "teacher_no_omics", "baseline", "student")))


def _c_per_seed(rows: np.ndarray, targets: np.ndarray, seeds: int) -> list[float]:
    result = []
    for seed in range(seeds):
        mine = rows[rows[:, 1] == seed]
        idx = mine[:, 0].astype(int)
        result.append(M.c_index(targets[idx, 0], targets[idx, 1], mine[:, 2]))
    return result


def _run_split(cfg: AmkdConfig, sp: Split, task: Task, targets: np.ndarray, omics: np.ndarray, cohort: Cohort,
               reader: BagReader, device: torch.device) -> dict[str, np.ndarray]:
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
    train_ds, val_ds = dataset(sp.train, cfg.max_tiles), dataset(sp.val, None) if len(sp.val) else None
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

    _fit(teacher, lambda b, rows, training: fitted.loss(teacher_out(b, rows, training).logits, b.y), train_ds,
         sp.train, val_ds, sp.val, cfg, device, seed)
    t_risk, t_emb = _outputs(lambda b, rows: teacher_out(b, rows, False), dataset(every, None), every, cfg, device)
    no_omics, _ = _outputs(lambda b, rows: teacher_out(b, rows, False, with_omics=False), dataset(sp.test, None),
                           sp.test, cfg, device)
    result = {"teacher": t_risk[sp.test], "teacher_no_omics": no_omics}
    t_risk_t, t_emb_t = torch.from_numpy(t_risk), torch.from_numpy(t_emb)
    for name, weight in (("baseline", 0.0), ("student", cfg.weight)):
        torch.manual_seed(seed)
        student = build_head(cfg.head, dim, fitted.readout, fitted.n_classes).to(device)
        project = nn.Linear(student.embed_dim, teacher.embed_dim).to(device)

        def student_loss(b: BagBatch, rows: np.ndarray, training: bool, student=student, project=project,
                         weight=weight) -> Tensor:
            out = student(b.x, b.mask)
            loss = fitted.loss(out.logits, b.y)
            if weight:
                loss = loss + weight * kd_loss(out.logits[:, 0], project(out.embedding), t_risk_t[rows].to(device),
                                               t_emb_t[rows].to(device), cfg.tau)
            return loss

        _fit(nn.ModuleList([student, project]), student_loss, train_ds, sp.train, val_ds, sp.val, cfg, device, seed)
        result[name], _ = _outputs(lambda b, rows, student=student: student(b.x, b.mask), dataset(sp.test, None),
                                   sp.test, cfg, device)
    return result


def _fit(model: nn.Module, objective: Callable[[BagBatch, np.ndarray, bool], Tensor], train_ds: BagDataset,
         train_rows: np.ndarray, val_ds: BagDataset | None, val_rows: np.ndarray, cfg: AmkdConfig,
         device: torch.device, seed: int) -> None:
    """AdamW on ``objective``; keep the epoch where the same objective is lowest on the validation patients."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = make_loader(train_ds, cfg.batch_size, shuffle=True, seed=seed)
    best, best_state, waited = float("inf"), None, 0
    for epoch in range(cfg.epochs):
        train_ds.set_epoch(epoch)
        model.train()
        for b in batches(loader, device):
            loss = objective(b, train_rows[b.index.numpy()], True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if val_ds is None:
            continue
        model.eval()
        with torch.no_grad():
            val_loss = float(sum(objective(b, val_rows[b.index.numpy()], False) for b in batches(
                make_loader(val_ds, len(val_ds)), device)))
        if val_loss < best:
            best, waited = val_loss, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()


@torch.no_grad()
def _outputs(run: Callable[[BagBatch, np.ndarray], HeadOutput], ds: BagDataset, rows: np.ndarray, cfg: AmkdConfig,
             device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Risk (n,) and embedding (n, E) per dataset item, in dataset order."""
    risk: list[np.ndarray] = []
    emb: list[np.ndarray] = []
    order: list[np.ndarray] = []
    for b in batches(make_loader(ds, cfg.batch_size), device):
        out = run(b, rows[b.index.numpy()])
        risk.append(out.logits[:, 0].float().cpu().numpy())
        emb.append(out.embedding.float().cpu().numpy())
        order.append(b.index.numpy())
    position = np.argsort(np.concatenate(order))
    return np.concatenate(risk)[position], np.concatenate(emb)[position]
