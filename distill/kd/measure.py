"""How the finished student is measured: against its teacher on held-out tiles, and downstream on slides.

Held-out slides are only measured here, never used for any choice; the scores themselves are
``distill.kd.evaluate``'s.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch

from featurestore.devices import autocast
from featurestore.distill.data import ArrayBags, BagReader
from featurestore.distill.errors import ConfigError
from featurestore.distill.kd import evaluate as E
from featurestore.distill.kd.config import DistillConfig, Progress
from featurestore.distill.kd.data import CachedTiles, sequential_plan, to_student
from featurestore.distill.kd.loop import primary_target
from featurestore.distill.kd.students import StudentSpec
from featurestore.distill.schedule import TRAIN, TRAIN_CV
from featurestore.distill.tasks import TaskSpec
from featurestore.distill.train import TrainConfig, cross_validate, fold_metrics, load_cohort
from featurestore.encoders.student import StudentEncoder
from featurestore.schemas import EmbeddingSet, TilingSpec
from featurestore.store import Store


def embed(encoder: StudentEncoder, data: CachedTiles, plan: list[np.ndarray], spec: StudentSpec,
          device: torch.device, primary: str | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """Exported-encoder embeddings, primary-teacher targets, weak labels and slide indices of ``plan``'s
    tiles (no augmentation)."""
    encoder.eval()
    emb, teacher, labels, slides = [], [], [], []
    for batch in data.iterate(plan, augment=None, seed=0):
        batch = batch.to(device)
        x = to_student(batch.pixels, spec.mean, spec.std, augment=None, generator=torch.Generator())
        with torch.inference_mode(), autocast(device):
            emb.append(encoder(x).float().cpu().numpy())
        if primary is not None:
            teacher.append(primary_target(batch, primary).float().cpu().numpy())
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


def _subset(counts: list[int], cap: int, batch: int, seed: int) -> list[np.ndarray]:
    """An evaluation plan over at most ``cap`` units, drawn evenly at random from all slides."""
    items = np.concatenate([np.stack([np.full(n, s), np.arange(n)], 1) for s, n in enumerate(counts)])
    if len(items) > cap:
        items = items[np.sort(np.random.default_rng(seed).choice(len(items), cap, replace=False))]
    return [items[i:i + batch] for i in range(0, len(items), batch)]


def against_teacher(encoder: StudentEncoder, spec: StudentSpec, train: CachedTiles, heldout: CachedTiles, batch: int,
                    cfg: DistillConfig, device: torch.device, primary: str, classes: list[str]) -> dict[str, Any]:
    """Cosine to the primary teacher on held-out tiles, and probes of student vs teacher embeddings."""
    encoder.to(device)
    test_plan = sequential_plan([len(u) for u in heldout.units], batch)
    train_plan = _subset([len(u) for u in train.units], cfg.probe_tiles, batch, cfg.seed)
    s_test, t_test, y_test, _ = embed(encoder, heldout, test_plan, spec, device, primary)
    s_train, t_train, y_train, g_train = embed(encoder, train, train_plan, spec, device, primary)
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


def downstream(encoder: StudentEncoder, spec: StudentSpec, store: Store, teacher: EmbeddingSet,
               pixel_tiling: TilingSpec, slide_ids: list[str], labels: dict[str, int], cfg: DistillConfig,
               device: torch.device, say: Progress) -> dict[str, Any]:
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
    emb = embed(encoder, tiles, sequential_plan(tiles.n_tiles, cfg.schedule.batch_size), spec, device, None)[0]
    bags = np.split(emb, np.cumsum(tiles.n_tiles)[:-1])
    student_bags = ArrayBags(cfg.name or f"student:{cfg.out.name}", dict(zip(slide_ids, bags, strict=True)),
                             dict(zip(slide_ids, tiles.xy, strict=True)))
    train_cfg = TrainConfig(store=cfg.store, model=teacher.encoder_name, task=TaskSpec("classification", cfg.label),
                            out=cfg.out, schedule=replace(TRAIN, device=cfg.schedule.device, group=cfg.schedule.group),
                            cv=replace(TRAIN_CV, folds=cfg.downstream_folds), cache_gb=cfg.cache_gb, bootstrap=0,
                            heatmaps=0)
    try:
        cohort = load_cohort(store, student_bags, train_cfg.task, cfg.schedule.group, None)
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
