"""``fs distill`` as a Python API: a timm student trained against cached teacher targets only.

Stage two never builds or runs a teacher. Targets are teacher embeddings read from the store;
teacher logits come from a small head applied to them (``distill.kd.heads``). The ledger counts
teacher forward passes while the run lasts (``distill.kd.ledger``).

Slides are split once, by patient (``group``) and stratified by label, into training and
held-out slides (``distill.kd.cohort``); the held-out slides are only measured
(``distill.kd.measure``) — never used for any choice — and the last epoch's weights are kept.
Each epoch is a training pass and a held-out pass of ``distill.kd.loop.run_pass``. The run
directory is staged by ``distill.rundir`` and renamed when complete.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featurestore.devices import grad_scaler, resolve_device
from featurestore.distill.errors import ConfigError
from featurestore.distill.kd.cohort import cohort_slides, heldout_split, pixel_tiling, teacher_tiling, weak_labels
from featurestore.distill.kd.config import DistillConfig, DistillResult, Progress
from featurestore.distill.kd.data import CachedTiles, SlideBalancedSampler, sequential_plan
from featurestore.distill.kd.heads import load_teacher_head
from featurestore.distill.kd.ledger import TeacherPassCounter, cost, ledger
from featurestore.distill.kd.loop import TargetScaling, run_pass
from featurestore.distill.kd.measure import against_teacher, downstream
from featurestore.distill.kd.objectives import Objective, build_objective
from featurestore.distill.kd.report import write_report
from featurestore.distill.kd.rundir import save_weights, write_config
from featurestore.distill.kd.students import Student, create_student, export_encoder
from featurestore.distill.rundir import staged_run
from featurestore.store import Store


def distill(cfg: DistillConfig, on_progress: Progress | None = None) -> DistillResult:
    """Train a student as configured and write the run directory ``cfg.out`` (see the module docstring)."""
    say = on_progress or (lambda _: None)
    started = time.perf_counter()
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    with staged_run(cfg.out, run_id) as staging:
        with TeacherPassCounter() as passes:
            report = _distill(cfg, staging, run_id, say)
        report["ledger"]["teacher_forward_passes"] = passes.count
        report["ledger"]["wall_seconds"] = time.perf_counter() - started
        write_report(staging, report)
    say(f"run {run_id} written to {cfg.out}")
    return DistillResult(cfg.out, run_id, json.loads((cfg.out / "report.json").read_text()))


def _distill(cfg: DistillConfig, run_dir: Path, run_id: str, say: Progress) -> dict[str, Any]:
    store = Store.open(cfg.store, read_only=True)
    sets = [store.embedding_set(name) for name in cfg.teachers]
    teachers_on = teacher_tiling(store, sets)
    pixels = pixel_tiling(store, teachers_on, cfg)
    slide_ids = cohort_slides(store, cfg.teachers, sets, pixels)
    labels, classes, groups = weak_labels(store, cfg.label, cfg.schedule.group, slide_ids)
    needs_labels = cfg.objective in ("supervised", "logit") and (cfg.objective == "supervised"
                                                                 or cfg.objective_cfg.alpha > 0)
    if needs_labels and len(classes) < 2:
        raise ConfigError(f"{store.root}: objective {cfg.objective} needs a label column with two or more classes; "
                          f"--label {cfg.label!r} has {len(classes)}; import labels or pass --label COLUMN")
    train_ids, heldout_ids = heldout_split(slide_ids, groups, labels, cfg.holdout, cfg.split_seed)
    device = resolve_device(cfg.schedule.device)
    region = cfg.region if cfg.objective == "relational" else 1
    budget = int(cfg.cache_gb * 2**30)
    train = CachedTiles(store, sets, pixels, train_ids, labels, input_size=cfg.input_size, region=region,
                        cache_bytes=budget)
    heldout = CachedTiles(store, sets, pixels, heldout_ids, labels, input_size=cfg.input_size, region=region,
                          cache_bytes=budget)
    primary = sets[0].encoder_name
    say(f"{len(train_ids)} training / {len(heldout_ids)} held-out slides, {sum(train.n_tiles)} / "
        f"{sum(heldout.n_tiles)} tiles at {pixels.tile_size}@{pixels.target_mpp:g} → "
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
    units_per_batch = max(1, cfg.schedule.batch_size // region**2)
    fit = _fit(student, objective, train, heldout, units_per_batch, cfg=cfg, device=device, teacher_head=teacher_head,
               primary=primary, say=say)

    projection = objective.export_projection()
    if projection is not None and fit.scaling is not None:
        projection = fit.scaling.fold(primary, projection)
    encoder = export_encoder(student, projection)
    name = cfg.name or f"student:{cfg.out.name}"
    save_weights(run_dir, encoder, spec, objective, name=name, pixels=pixels, run_id=run_id)
    evaluation = against_teacher(encoder, spec, train, heldout, units_per_batch, cfg, device, primary, classes)
    evaluation["downstream"] = downstream(encoder, spec, store, sets[0], pixels, slide_ids, labels, cfg, device, say)
    run_cost = cost(encoder, spec, sets, store, device, cfg)
    write_config(run_dir, cfg, {"run_id": run_id, "train_slides": train_ids, "heldout_slides": heldout_ids,
                                "classes": classes, "pixel_tiling": pixels.id, "teacher_tiling": teachers_on.id,
                                "embedding_sets": {es.encoder_name: es.id for es in sets}, "encoder_name": name})
    return {
        "run_id": run_id, "objective": cfg.objective, "teachers": list(cfg.teachers),
        "student": {"arch": cfg.student, "input_size": cfg.input_size, "encoder_name": name,
                    "embed_dim": encoder.num_features},
        "pixels": f"{pixels.tile_size}@{pixels.target_mpp:g}", "k": train.k, "cached_views": train.views,
        "slides": {"train": len(train_ids), "heldout": len(heldout_ids)},
        "history": fit.history, "evaluation": evaluation, "cost": run_cost,
        "ledger": ledger(cfg, run_cost, fit.target_tiles, fit.seconds),
    }


@dataclass(frozen=True)
class _Fit:
    """What training left besides the weights: per-epoch curves, teacher targets consumed, seconds spent,
    and the target scaling the exported projection folds back (None without ``standardize``)."""

    history: dict[str, list]
    target_tiles: int
    seconds: float
    scaling: TargetScaling | None


def _fit(student: Student, objective: Objective, train: CachedTiles, heldout: CachedTiles, units_per_batch: int, *,
         cfg: DistillConfig, device: torch.device, teacher_head: nn.Module | None, primary: str,
         say: Progress) -> _Fit:
    """``schedule.epochs`` epochs of AdamW under linear warm-up and cosine decay, each followed by a held-out pass."""
    counts = [len(u) for u in train.units]
    per_slide = cfg.tiles_per_slide or int(np.median(counts))
    sampler = SlideBalancedSampler(counts, per_slide, units_per_batch,
                                   sizes=[train.slide_bytes(i) for i in range(len(train.slide_ids))],
                                   budget=int(cfg.cache_gb * 2**30), seed=cfg.seed)
    schedule = cfg.schedule
    steps = max(1, schedule.epochs * len(sampler.epoch(0)))
    params = [*student.parameters(), *objective.parameters()]
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup)
                                                  * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    scaler = grad_scaler(device)
    eval_plan = sequential_plan([len(u) for u in heldout.units], units_per_batch)
    history: dict[str, list] = {"train_loss": [], "heldout_loss": [], "heldout_cosine": [], "train_terms": []}
    target_tiles = 0
    started = time.perf_counter()
    scaling = TargetScaling({n: train.target_stats(n) for n in train.names}, device) if cfg.standardize else None
    common = {"cfg": cfg, "device": device, "teacher_head": teacher_head, "primary": primary, "scaling": scaling}
    for epoch in range(schedule.epochs):
        trained = run_pass(student, objective, train, sampler.epoch(epoch), optimizer=optimizer, scheduler=scheduler,
                       scaler=scaler, seed=cfg.seed * 100003 + epoch, **common)
        target_tiles += trained.targets
        check = run_pass(student, objective, heldout, eval_plan, **common)
        history["train_loss"].append(trained.loss)
        history["train_terms"].append({k: v / trained.steps for k, v in trained.terms.items()})
        history["heldout_loss"].append(check.loss)
        history["heldout_cosine"].append(check.cosine)
        cos = "" if check.cosine is None else f", held-out cosine {check.cosine:.3f}"
        say(f"epoch {epoch + 1}/{schedule.epochs}: train loss {trained.loss:.4f}, held-out loss {check.loss:.4f}{cos}")
    return _Fit(history, target_tiles, time.perf_counter() - started, scaling)
