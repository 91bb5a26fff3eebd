"""``fs distill`` as a Python API: a timm student trained against cached teacher targets only.

Stage two never builds or runs a teacher. Targets are teacher embeddings read from the store;
teacher logits come from a small head applied to them (``distill.kd.heads``). While a run lasts,
a forward hook on every module counts calls into any ``featurestore.encoders.Teacher``, and the
cost ledger records that count (0) next to the teacher compute the cache saved.

Slides are split once, by patient (``group``) and stratified by label, into training and
held-out slides; the held-out slides are only measured — never used for any choice — and the
last epoch's weights are kept. On CUDA the student runs under autocast (bfloat16, else float16
with loss scaling); on CPU a fixed seed reproduces a run bit for bit. The run directory is written
under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from featurestore.distill.data import ArrayBags, BagReader
from featurestore.distill.errors import ConfigError, check_new_run_dir
from featurestore.distill.kd import evaluate as E
from featurestore.distill.kd.data import (
    DIHEDRAL_VIEWS,
    Augment,
    CachedTiles,
    SlideBalancedSampler,
    dihedral_each,
    sequential_plan,
    to_student,
)
from featurestore.distill.kd.heads import load_teacher_head
from featurestore.distill.kd.objectives import (
    BASELINES,
    OBJECTIVES,
    Objective,
    ObjectiveConfig,
    StudentOutput,
    Targets,
    build_objective,
)
from featurestore.distill.kd.report import write_report
from featurestore.distill.kd.students import Student, create_student, export_encoder, save_student
from featurestore.distill.tasks import TaskSpec
from featurestore.distill.train import TrainConfig, cross_validate, fold_metrics, load_cohort
from featurestore.schemas import EmbeddingSet, TilingSpec
from featurestore.store import Store

Progress = Callable[[str], None]


@dataclass(frozen=True)
class DistillConfig:
    """Everything ``fs distill`` accepts; the resolved copy is saved as ``RUN_DIR/config.json``.

    ``epochs`` 0 evaluates the untrained student: the from-scratch starting point, as a reference.
    ``pixels`` (``SIZE@MPP``) picks the cached tiling the student sees: by default the teacher
    tiling, or for ``xmag`` the cached coarser tiling. ``input_size`` is the student's input (tiles
    are resized to it). ``tiles_per_slide`` units per slide per epoch (0: the median slide's count;
    units are tiles, or region×region neighbourhoods for ``relational``). ``holdout`` is the share
    of patients held out. ``label`` names the slide label broadcast to tiles as weak labels (probes,
    ``logit``'s CE term, ``supervised``); ``group`` the column keeping a patient's slides together.
    The from-scratch baselines (``supervised``, ``simsiam``) use their teacher only to pair tiles and to
    be evaluated against it. ``standardize`` trains against
    centred, scaled targets (``TargetScaling``). ``split_seed`` draws the held-out patients apart from
    ``seed``, so runs with different seeds are measured on the same slides. ``downstream_folds``
    (0: skip) cross-validates ``fs train``'s default ABMIL head on ``label`` over every slide, once
    on the student's embeddings of the cached pixels and once on the primary teacher's bags.
    """

    store: Path
    teachers: tuple[str, ...]
    student: str
    objective: str
    out: Path
    pixels: str | None = None
    input_size: int = 112
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    tiles_per_slide: int = 0
    holdout: float = 0.25
    label: str | None = "label"
    group: str | None = "patient"
    seed: int = 0
    split_seed: int = 0
    device: str = "auto"
    augment: Augment | None = field(default_factory=Augment)
    region: int = 4
    teacher_head: Path | None = None
    objective_cfg: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    cache_gb: float = 4.0
    standardize: bool = True
    probe_tiles: int = 20000
    downstream_folds: int = 3
    measure_speed: bool = True
    name: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", Path(self.store))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "teachers", tuple(self.teachers))
        checks = [(self.objective in OBJECTIVES, f"unknown --objective {self.objective!r}; choose one of "
                   f"{', '.join(OBJECTIVES)}"),
                  (self.epochs >= 0 and self.batch_size >= 2, "--epochs must be >= 0 and --batch-size >= 2"),
                  (self.input_size >= 16, "--input-size must be >= 16"), (self.lr > 0, "--lr must be > 0"),
                  (0 < self.holdout < 1, "--holdout must be in (0, 1)"), (self.region >= 2, "--region must be >= 2"),
                  (self.tiles_per_slide >= 0 and self.cache_gb > 0, "--tiles-per-slide >= 0 and --cache-gb > 0"),
                  (self.downstream_folds == 0 or self.downstream_folds >= 2, "--downstream-folds must be 0 or >= 2"),
                  (bool(self.teachers), "pass at least one --teacher (baselines use it only for evaluation)"),
                  (self.objective != "logit" or self.teacher_head is not None,
                   "--objective logit needs --teacher-head (a linear head file or an fs train run directory)")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return out | {"store": str(self.store.resolve()), "out": str(self.out.resolve()),
                      "teachers": list(self.teachers),
                      "augment": None if self.augment is None else asdict(self.augment),
                      "objective_cfg": asdict(self.objective_cfg),
                      "teacher_head": None if self.teacher_head is None else str(self.teacher_head)}


@dataclass(frozen=True)
class DistillResult:
    run_dir: Path
    run_id: str
    report: dict[str, Any]


class TeacherPassCounter:
    """Counts forward calls into any ``featurestore.encoders.Teacher`` while active (a global module hook)."""

    def __enter__(self) -> TeacherPassCounter:
        from featurestore.encoders import Teacher

        self.count = 0

        def hook(module: nn.Module, args: tuple) -> None:
            if isinstance(module, Teacher):
                self.count += 1

        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


class TargetScaling:
    """Teacher targets centred on their training mean and divided by their RMS deviation from it.

    Embeddings of ReLU networks are all positive, so raw targets are dominated by their mean (a
    constant predictor already has a cosine of about 0.8 to them); centred, every objective fits what
    differs between tiles. The exported projection folds the scaling back (``fold``), so the
    student still embeds in its teacher's own space.
    """

    def __init__(self, stats: dict[str, tuple[np.ndarray, float]], device: torch.device) -> None:
        self.mean = {k: torch.from_numpy(m).to(device) for k, (m, _) in stats.items()}
        self.scale = {k: s for k, (_, s) in stats.items()}

    def __call__(self, teachers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (t - self.mean[k]) / self.scale[k] for k, t in teachers.items()}

    def unscale(self, name: str, z: torch.Tensor) -> torch.Tensor:
        return z * self.scale[name] + self.mean[name]

    def fold(self, name: str, linear: nn.Linear) -> nn.Linear:
        """``linear`` followed by ``unscale``, as one linear layer."""
        out = nn.Linear(linear.in_features, linear.out_features).to(linear.weight.device)
        with torch.no_grad():
            out.weight.copy_(linear.weight * self.scale[name])
            out.bias.copy_(self.unscale(name, linear.bias))
        return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return device


def amp_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _teacher_tiling(store: Store, sets: list[EmbeddingSet]) -> TilingSpec:
    tilings = {es.tiling_id for es in sets}
    if len(tilings) > 1:
        raise ConfigError(f"{store.root}: the teachers were extracted on different tilings ({', '.join(tilings)}); "
                          "distil teachers that share one tile index (extract them in one fs extract run)")
    return next(t for t in store.tilings() if t.id == sets[0].tiling_id)


def _pixel_tiling(store: Store, teacher: TilingSpec, cfg: DistillConfig) -> TilingSpec:
    """The cached-pixel tiling the student sees (see ``DistillConfig.pixels``)."""
    cached = set(store.sql("SELECT DISTINCT tiling_id FROM slide_tilings WHERE pixels").column(0).to_pylist())
    tilings = [t for t in store.tilings() if t.id in cached]
    listed = ", ".join(f"{t.tile_size}@{t.target_mpp:g}" for t in tilings) or "none"
    fix = f"cached: {listed}; cache them with fs extract --cache-pixels SIZE@MPP"
    if cfg.pixels:
        try:
            size, mpp = (float(v) for v in cfg.pixels.split("@"))
        except ValueError as err:
            raise ConfigError(f"--pixels {cfg.pixels!r}: expected SIZE@MPP such as 224@0.5") from err
        found = [t for t in tilings if t.tile_size == size and math.isclose(t.target_mpp, mpp)]
        if not found:
            raise ConfigError(f"{store.root}: no pixels cached at {cfg.pixels} ({fix})")
        pixel = next((t for t in found if t.id == teacher.id), found[0])
    elif cfg.objective == "xmag":
        coarser = [t for t in tilings if t.tile_size * t.target_mpp > teacher.tile_size * teacher.target_mpp * 1.5]
        if len(coarser) != 1:
            raise ConfigError(f"{store.root}: xmag needs one cached lower-magnification tiling, found {len(coarser)} "
                              f"({fix}); pick one with --pixels SIZE@MPP")
        pixel = coarser[0]
    else:
        if teacher.id not in cached:
            raise ConfigError(f"{store.root}: no pixels cached on the teacher tiling "
                              f"{teacher.tile_size}@{teacher.target_mpp:g} ({fix})")
        pixel = teacher
    coarse = pixel.id != teacher.id
    ratio = pixel.tile_size * pixel.target_mpp / (teacher.tile_size * teacher.target_mpp)
    if coarse and (round(ratio) < 2 or abs(ratio - round(ratio)) > 1e-6):
        raise ConfigError(f"--pixels {pixel.tile_size}@{pixel.target_mpp:g}: its tiles must cover k×k teacher tiles "
                          f"(k >= 2) of {teacher.tile_size}@{teacher.target_mpp:g}, or be the teacher tiling itself")
    if coarse != (cfg.objective == "xmag") and cfg.objective not in BASELINES:
        raise ConfigError(f"--pixels {pixel.tile_size}@{pixel.target_mpp:g} with objective {cfg.objective}: "
                          + ("pixels on another tiling pair with k×k teacher tiles; use --objective xmag"
                             if coarse else "xmag needs pixels at a lower magnification than the teacher's"))
    return pixel


def _labels(store: Store, column: str | None, group: str | None,
            slide_ids: list[str]) -> tuple[dict[str, int], list[str], dict[str, str]]:
    """Weak label class per slide, the class names, and the patient of each slide (its own id if none)."""
    table = store.sql("SELECT * FROM labels")
    rows = {r["slide_id"]: r for r in table.to_pylist()}
    groups = {s: str(rows.get(s, {}).get(group) or s) if group else s for s in slide_ids}
    if not column or column not in table.column_names:
        return {}, [], groups
    values = {s: str(rows[s][column]) for s in slide_ids if s in rows and rows[s][column] not in (None, "")}
    names = sorted(set(values.values()), key=lambda v: (not _is_number(v), float(v) if _is_number(v) else 0, v))
    return {s: names.index(v) for s, v in values.items()}, names, groups


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def heldout_split(slide_ids: list[str], groups: dict[str, str], labels: dict[str, int], fraction: float,
                  seed: int) -> tuple[list[str], list[str]]:
    """(training, held-out) slides. Whole patients are held out: from each label stratum (a patient's
    most frequent slide label, −1 unlabelled) round(fraction·n) of its n patients, at least one when
    n ≥ 2, drawn at random from ``seed`` — so even a cohort of a few patients holds out every class."""
    strata: dict[int, list[str]] = {}
    for patient in sorted(set(groups.values())):
        values = [labels.get(s, -1) for s in slide_ids if groups[s] == patient]
        strata.setdefault(max(set(values), key=values.count), []).append(patient)
    rng = np.random.default_rng(seed)
    held: set[str] = set()
    for _, patients in sorted(strata.items()):
        n = len(patients)
        take = min(n - 1, max(1, round(fraction * n))) if n >= 2 else 0
        held.update(rng.permutation(patients)[:take].tolist())
    if not held:
        raise ConfigError(f"--holdout {fraction:g}: the cohort has too few patients per label to hold any out "
                          "(need two in a label); add slides")
    return [s for s in slide_ids if groups[s] not in held], [s for s in slide_ids if groups[s] in held]


def _targets(batch, teacher_head: nn.Module | None, primary: str, scaling: TargetScaling | None,
             second_view: StudentOutput | None) -> Targets:
    """The objective's view of a batch: scaled teacher embeddings, and head logits from the raw ones."""
    logits = None
    if teacher_head is not None:
        with torch.no_grad():
            logits = teacher_head(batch.teachers[primary])
    teachers = scaling(batch.teachers) if scaling is not None else batch.teachers
    return Targets(teachers, batch.child_mask, batch.labels, logits, batch.regions, second_view)


def _primary_target(batch, primary: str) -> torch.Tensor:
    """The primary teacher's embedding of each tile; for XMAG the mean of the existing children."""
    t = batch.teachers[primary]
    if batch.child_mask is None:
        return t
    mask = batch.child_mask.float()
    return (t * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


@dataclass
class PassResult:
    """Sums of one pass over batches: loss terms, cosine to the primary teacher, targets consumed."""

    terms: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    cosine_sum: float = 0.0
    tiles: int = 0
    targets: int = 0

    def add(self, terms: dict[str, torch.Tensor], batch) -> None:
        for k, v in terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + float(v.detach())
        self.steps += 1
        self.targets += int(batch.child_mask.sum()) if batch.child_mask is not None else len(batch.tile)

    @property
    def loss(self) -> float:
        return sum(self.terms.values()) / max(self.steps, 1)

    @property
    def cosine(self) -> float | None:
        return self.cosine_sum / self.tiles if self.tiles else None


def run_pass(student: Student, objective: Objective, data: CachedTiles, plan: list[np.ndarray], *,
             cfg: DistillConfig, device: torch.device, teacher_head: nn.Module | None, primary: str,
             scaling: TargetScaling | None, optimizer: torch.optim.Optimizer | None = None,
             scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
             scaler: torch.amp.GradScaler | None = None, seed: int = 0) -> PassResult:
    """Train on (with ``optimizer``) or evaluate ``plan``'s batches; returns the pass's sums. Public
    for ``benchmarks/bench_distill.py``, which times this very loop against its alternatives."""
    training = optimizer is not None
    student.train(training)
    objective.train(training)
    generator = torch.Generator().manual_seed(seed)
    amp = amp_dtype(device)
    augment = cfg.augment if training else None
    projection = objective.export_projection()
    result = PassResult()
    for batch in data.iterate(plan, augment=augment, seed=seed):
        batch = batch.to(device)
        x = to_student(batch.pixels, student.spec.mean, student.spec.std, augment=augment, generator=generator)
        with torch.set_grad_enabled(training), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = student(x)
            second = None
            if objective.views == 2:
                views = torch.randint(0, DIHEDRAL_VIEWS, (len(x),), generator=generator) if augment else \
                    torch.zeros(len(x), dtype=torch.long)
                second = student(to_student(dihedral_each(batch.pixels, views.to(batch.pixels.device)),
                                            student.spec.mean, student.spec.std, augment=augment, generator=generator))
            terms = objective(out, _targets(batch, teacher_head, primary, scaling, second))
        loss = torch.stack([v.float() for v in terms.values()]).sum()
        if training:
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
        elif projection is not None:
            with torch.no_grad():
                z = projection(out.embedding.float())
                z = scaling.unscale(primary, z) if scaling is not None else z
                cos = torch.nn.functional.cosine_similarity(z, _primary_target(batch, primary), dim=1)
            result.cosine_sum += float(cos.sum())
            result.tiles += len(cos)
        result.add(terms, batch)
    return result


def _embed(encoder: nn.Module, data: CachedTiles, plan: list[np.ndarray], spec, device: torch.device,
           primary: str | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """Exported-encoder embeddings, primary-teacher targets, weak labels and slide indices of ``plan``'s
    tiles (no augmentation)."""
    encoder.eval()
    emb, teacher, labels, slides = [], [], [], []
    amp = amp_dtype(device)
    for batch in data.iterate(plan, augment=None, seed=0):
        batch = batch.to(device)
        x = to_student(batch.pixels, spec.mean, spec.std, augment=None, generator=torch.Generator())
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            emb.append(encoder(x).float().cpu().numpy())
        if primary is not None:
            teacher.append(_primary_target(batch, primary).float().cpu().numpy())
        labels.append(batch.labels.cpu().numpy())
        slides.append(batch.slide.cpu().numpy())
    return (np.concatenate(emb), np.concatenate(teacher) if teacher else None, np.concatenate(labels),
            np.concatenate(slides))


def _probe(train: tuple[np.ndarray, np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> dict | None:
    (x_tr, y_tr, g_tr), (x_te, y_te) = train, test
    keep_tr, keep_te = y_tr >= 0, y_te >= 0
    if len(np.unique(y_tr[keep_tr])) < 2 or len(np.unique(y_te[keep_te])) < 2:
        return None
    return E.probe_scores(x_tr[keep_tr], y_tr[keep_tr], g_tr[keep_tr], x_te[keep_te], y_te[keep_te])


def _stage_one_tiles_per_s(store: Store, es: EmbeddingSet) -> float | None:
    """Tiles of ``es`` over the device seconds of every finished extraction run (all their teachers together)."""
    seconds = sum(r.device_seconds for r in store.runs() if r.status == "ok")
    tiles = store.sql(f"SELECT sum(n_tiles) AS n FROM bags WHERE set_id = '{es.id}'").column("n")[0].as_py()
    return float(tiles) / seconds if seconds and tiles else None


def _subset(counts: list[int], cap: int, batch: int, seed: int) -> list[np.ndarray]:
    """An evaluation plan over at most ``cap`` units, drawn evenly at random from all slides."""
    items = np.concatenate([np.stack([np.full(n, s), np.arange(n)], 1) for s, n in enumerate(counts)])
    if len(items) > cap:
        items = items[np.sort(np.random.default_rng(seed).choice(len(items), cap, replace=False))]
    return [items[i:i + batch] for i in range(0, len(items), batch)]


def distill(cfg: DistillConfig, on_progress: Progress | None = None) -> DistillResult:
    """Train a student as configured and write the run directory ``cfg.out`` (see the module docstring)."""
    say = on_progress or (lambda _: None)
    started = time.perf_counter()
    check_new_run_dir(cfg.out)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    staging = cfg.out.parent / f".{cfg.out.name}.partial-{run_id}"
    staging.mkdir(parents=True)
    try:
        with TeacherPassCounter() as passes:
            report = _distill(cfg, staging, run_id, say)
        report["ledger"]["teacher_forward_passes"] = passes.count
        report["ledger"]["wall_seconds"] = time.perf_counter() - started
        write_report(staging, report)
        if cfg.out.exists():
            cfg.out.rmdir()
        staging.rename(cfg.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"run {run_id} written to {cfg.out}")
    return DistillResult(cfg.out, run_id, json.loads((cfg.out / "report.json").read_text()))


def _distill(cfg: DistillConfig, run_dir: Path, run_id: str, say: Progress) -> dict[str, Any]:
    store = Store.open(cfg.store, read_only=True)
    sets = [store.embedding_set(name) for name in cfg.teachers]
    teacher_tiling = _teacher_tiling(store, sets)
    pixel_tiling = _pixel_tiling(store, teacher_tiling, cfg)
    with_pixels = set(store.sql(f"SELECT slide_id FROM slide_tilings WHERE tiling_id = '{pixel_tiling.id}' AND pixels")
                      .column("slide_id").to_pylist())
    slide_ids = sorted(with_pixels.intersection(*(set(store.sql(f"SELECT slide_id FROM bags WHERE set_id = '{es.id}'")
                                                        .column("slide_id").to_pylist()) for es in sets)))
    if not slide_ids:
        raise ConfigError(f"{store.root}: no slide has both cached pixels at {pixel_tiling.tile_size}@"
                          f"{pixel_tiling.target_mpp:g} and embeddings of {', '.join(cfg.teachers)}; run fs extract")
    labels, classes, groups = _labels(store, cfg.label, cfg.group, slide_ids)
    needs_labels = cfg.objective in ("supervised", "logit") and (cfg.objective == "supervised"
                                                                 or cfg.objective_cfg.alpha > 0)
    if needs_labels and len(classes) < 2:
        raise ConfigError(f"{store.root}: objective {cfg.objective} needs a label column with two or more classes; "
                          f"--label {cfg.label!r} has {len(classes)}; import labels or pass --label COLUMN")
    train_ids, heldout_ids = heldout_split(slide_ids, groups, labels, cfg.holdout, cfg.split_seed)
    device = resolve_device(cfg.device)
    region = cfg.region if cfg.objective == "relational" else 1
    budget = int(cfg.cache_gb * 2**30)
    train = CachedTiles(store, sets, pixel_tiling, train_ids, labels, input_size=cfg.input_size, region=region,
                        cache_bytes=budget)
    heldout = CachedTiles(store, sets, pixel_tiling, heldout_ids, labels, input_size=cfg.input_size, region=region,
                          cache_bytes=budget)
    primary = sets[0].encoder_name
    say(f"{len(train_ids)} training / {len(heldout_ids)} held-out slides, {sum(train.n_tiles)} / "
        f"{sum(heldout.n_tiles)} tiles at {pixel_tiling.tile_size}@{pixel_tiling.target_mpp:g} → "
        f"{cfg.input_size} px; teachers {', '.join(cfg.teachers)}; {train.views} cached view(s); {device}")

    torch.manual_seed(cfg.seed)
    backbone, spec = create_student(cfg.student, cfg.input_size)
    student = Student(backbone, spec)
    objective = build_objective(cfg.objective, cfg.objective_cfg, student_dim=student.dim, channels=student.channels,
                                teacher_dims={es.encoder_name: es.embed_dim for es in sets}, n_classes=len(classes),
                                k=train.k)
    teacher_head = load_teacher_head(cfg.teacher_head, sets[0].embed_dim).to(device) if cfg.teacher_head else None
    student.to(device, memory_format=torch.channels_last)
    objective.to(device)

    units_per_batch = max(1, cfg.batch_size // region**2)
    counts = [len(u) for u in train.units]
    per_slide = cfg.tiles_per_slide or int(np.median(counts))
    sampler = SlideBalancedSampler(counts, per_slide, units_per_batch,
                                   sizes=[train.slide_bytes(i) for i in range(len(train_ids))], budget=budget,
                                   seed=cfg.seed)
    steps = max(1, cfg.epochs * len(sampler.epoch(0)))
    params = [*student.parameters(), *objective.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup)
                                                  * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype(device) == torch.float16)
    eval_plan = sequential_plan([len(u) for u in heldout.units], units_per_batch)
    history: dict[str, list] = {"train_loss": [], "heldout_loss": [], "heldout_cosine": [], "train_terms": []}
    target_tiles = 0
    train_started = time.perf_counter()
    scaling = TargetScaling({n: train.target_stats(n) for n in train.names}, device) if cfg.standardize else None
    common = {"cfg": cfg, "device": device, "teacher_head": teacher_head, "primary": primary, "scaling": scaling}
    for epoch in range(cfg.epochs):
        fit = run_pass(student, objective, train, sampler.epoch(epoch), optimizer=optimizer, scheduler=scheduler,
                       scaler=scaler, seed=cfg.seed * 100003 + epoch, **common)
        target_tiles += fit.targets
        check = run_pass(student, objective, heldout, eval_plan, **common)
        history["train_loss"].append(fit.loss)
        history["train_terms"].append({k: v / fit.steps for k, v in fit.terms.items()})
        history["heldout_loss"].append(check.loss)
        history["heldout_cosine"].append(check.cosine)
        cos = "" if check.cosine is None else f", held-out cosine {check.cosine:.3f}"
        say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {fit.loss:.4f}, held-out loss {check.loss:.4f}{cos}")
    train_seconds = time.perf_counter() - train_started

    projection = objective.export_projection()
    if projection is not None and scaling is not None:
        projection = scaling.fold(primary, projection)
    encoder = export_encoder(student, projection)
    name = cfg.name or f"student:{cfg.out.name}"
    save_student(run_dir, encoder, spec, name=name, tile_size=pixel_tiling.tile_size, mpp=pixel_tiling.target_mpp,
                 version=run_id)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in objective.state_dict().items()},
              run_dir / "objective.safetensors")
    evaluation = _evaluate(encoder, spec, train, heldout, units_per_batch, cfg, device, primary, classes)
    evaluation["downstream"] = _downstream(encoder, spec, store, sets[0], pixel_tiling, slide_ids, labels, cfg,
                                           device, say)
    cost = _cost(encoder, spec, sets, store, device, cfg)
    gflops = [cost["teacher"]["flops_by_teacher"][n] for n in cfg.teachers]
    config = cfg.to_dict() | {"run_id": run_id, "train_slides": train_ids, "heldout_slides": heldout_ids,
                              "classes": classes, "pixel_tiling": pixel_tiling.id, "teacher_tiling": teacher_tiling.id,
                              "embedding_sets": {es.encoder_name: es.id for es in sets}, "encoder_name": name,
                              "python": platform.python_version(), "torch": torch.__version__}
    (run_dir / "config.json").write_text(json.dumps(config, indent=1, default=str) + "\n")
    training_targets = cfg.objective not in BASELINES
    return {
        "run_id": run_id, "objective": cfg.objective, "teachers": list(cfg.teachers),
        "student": {"arch": cfg.student, "input_size": cfg.input_size, "encoder_name": name,
                    "embed_dim": encoder.num_features},
        "pixels": f"{pixel_tiling.tile_size}@{pixel_tiling.target_mpp:g}", "k": train.k, "cached_views": train.views,
        "slides": {"train": len(train_ids), "heldout": len(heldout_ids)},
        "history": history, "evaluation": evaluation, "cost": cost,
        "ledger": {"teacher_forward_passes": None, "wall_seconds": None, "train_seconds": train_seconds,
                   "epochs": cfg.epochs, "target_tiles": target_tiles if training_targets else 0,
                   "views_per_target": 1,
                   "teacher_flops_avoided": (sum(gflops) * target_tiles if training_targets and None not in gflops
                                             else None)},
    }


def _evaluate(encoder: nn.Module, spec, train: CachedTiles, heldout: CachedTiles, batch: int, cfg: DistillConfig,
              device: torch.device, primary: str, classes: list[str]) -> dict[str, Any]:
    """Cosine to the primary teacher on held-out tiles, and probes of student vs teacher embeddings."""
    encoder.to(device)
    test_plan = sequential_plan([len(u) for u in heldout.units], batch)
    train_plan = _subset([len(u) for u in train.units], cfg.probe_tiles, batch, cfg.seed)
    s_test, t_test, y_test, _ = _embed(encoder, heldout, test_plan, spec, device, primary)
    s_train, t_train, y_train, g_train = _embed(encoder, train, train_plan, spec, device, primary)
    projected = s_test.shape[1] == t_test.shape[1] and encoder.projection is not None
    cosine = E.cosine_to_teacher(s_test, t_test, t_train.mean(0)) if projected else None
    out: dict[str, Any] = {"heldout_tiles": len(y_test), "probe_train_tiles": len(y_train), "classes": classes,
                           "cosine": asdict(cosine) if cosine else {"mean": None, "centred": None,
                                                                    "mean_baseline": None}, "probe": {}}
    student_probe = _probe((s_train, y_train, g_train), (s_test, y_test))
    teacher_probe = _probe((t_train, y_train, g_train), (t_test, y_test))
    if student_probe and teacher_probe:
        out["probe"] = {"student": student_probe["metrics"], "teacher": teacher_probe["metrics"],
                        "agreement": {"linear": float(np.mean(student_probe["linear"] == teacher_probe["linear"])),
                                      "knn": float(np.mean(student_probe["knn"] == teacher_probe["knn"]))}}
    return out


def _downstream(encoder: nn.Module, spec, store: Store, teacher: EmbeddingSet, pixel_tiling: TilingSpec,
                slide_ids: list[str], labels: dict[str, int], cfg: DistillConfig, device: torch.device,
                say: Progress) -> dict[str, Any]:
    """Slide-level MIL on the student's bags vs the teacher's, same splits, seeds and head initialisation.

    Tile probes ask whether the student kept the teacher's information; this asks whether it can
    replace the teacher where the embeddings are used: ``fs train``'s ABMIL on the slide label.
    Every slide takes part (the tile hold-out does not apply: the heads are cross-validated), and
    the student embeds every cached tile of the pixel tiling, so an XMAG student is compared on
    its own coarser bags.
    """
    if not cfg.downstream_folds or not cfg.label:
        return {"skipped": "--downstream-folds 0" if cfg.label else "no --label"}
    tiles = CachedTiles(store, [teacher], pixel_tiling, slide_ids, labels, input_size=cfg.input_size,
                        cache_bytes=int(cfg.cache_gb * 2**30))
    emb = _embed(encoder, tiles, sequential_plan(tiles.n_tiles, cfg.batch_size), spec, device, None)[0]
    bags = np.split(emb, np.cumsum(tiles.n_tiles)[:-1])
    student_bags = ArrayBags(cfg.name or f"student:{cfg.out.name}", dict(zip(slide_ids, bags, strict=True)),
                             dict(zip(slide_ids, tiles.xy, strict=True)))
    train_cfg = TrainConfig(store=cfg.store, model=teacher.encoder_name, task=TaskSpec("classification", cfg.label),
                            out=cfg.out, folds=cfg.downstream_folds, group=cfg.group, device=cfg.device,
                            cache_gb=cfg.cache_gb, bootstrap=0, heatmaps=0)
    try:
        cohort = load_cohort(store, student_bags, train_cfg.task, cfg.group, None)
        out: dict[str, Any] = {"task": f"classification of {cfg.label!r}", "head": train_cfg.head.name,
                               "folds": cfg.downstream_folds, "slides": len(cohort.slide_ids)}
        for who, bags in (("student", student_bags), ("teacher", BagReader(store, teacher))):
            task, rows = cross_validate(train_cfg, bags, cohort, device)
            out[who] = fold_metrics(task, rows)
            out["metric"] = task.primary
    except ConfigError as err:
        return {"skipped": str(err)}
    say(f"downstream {train_cfg.head.name} ({cfg.downstream_folds}-fold {out['metric']}): student "
        f"{out['student'][out['metric']]:.3f}, teacher {out['teacher'][out['metric']]:.3f}")
    return out


def _cost(encoder: nn.Module, spec, sets: list[EmbeddingSet], store: Store, device: torch.device,
          cfg: DistillConfig) -> dict[str, Any]:
    """Parameters, FLOPs per tile and tiles/s of the student (measured) and the teachers (stage one).

    Teacher totals add up every teacher of the run, as online distillation would run them all."""
    flops, params, how = {}, {}, {}
    for es in sets:
        flops[es.encoder_name], params[es.encoder_name], how[es.encoder_name] = E.teacher_flops(es.encoder_name)

    def total(values: dict[str, int | None]) -> int | None:
        return None if None in values.values() else sum(values.values())

    return {
        "student": {"parameters": E.count_parameters(encoder), "flops": E.forward_flops(encoder, spec.input_size),
                    "tiles_per_s": E.tiles_per_second(encoder, spec.input_size, device) if cfg.measure_speed else None,
                    "device": str(device)},
        "teacher": {"flops": total(flops), "flops_by_teacher": flops, "flops_source": how,
                    "parameters": total(params),
                    "tiles_per_s": _stage_one_tiles_per_s(store, sets[0]),
                    "tiles_per_s_source": "stage one: tiles of the primary set / device seconds of all finished "
                                          "extraction runs (every teacher they ran)"},
    }
