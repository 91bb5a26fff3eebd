"""Which cached tilings and slides a distillation run uses, their weak labels, and the held-out split."""

from __future__ import annotations

import math

import numpy as np

from featurestore.distill.errors import ConfigError
from featurestore.distill.kd.config import DistillConfig
from featurestore.distill.kd.objectives import BASELINES
from featurestore.schemas import EmbeddingSet, TilingSpec
from featurestore.store import Store


def teacher_tiling(store: Store, sets: list[EmbeddingSet]) -> TilingSpec:
    tilings = {es.tiling_id for es in sets}
    if len(tilings) > 1:
        raise ConfigError(f"{store.root}: the teachers were extracted on different tilings ({', '.join(tilings)}); "
                          "distil teachers that share one tile index (extract them in one fs extract run)")
    return next(t for t in store.tilings() if t.id == sets[0].tiling_id)


def pixel_tiling(store: Store, teacher: TilingSpec, cfg: DistillConfig) -> TilingSpec:
    """The cached-pixel tiling the student sees (see ``DistillConfig.pixels``)."""
    cached = set(store.sql("SELECT DISTINCT tiling_id FROM slide_tilings WHERE pixels").column(0).to_pylist())
    tilings = [t for t in store.tilings() if t.id in cached]
    listed = ", ".join(f"{t.tile_size}@{t.target_mpp:g}" for t in tilings) or "none"
    fix = f"cached: {listed}; cache them with fs extract --cache-pixels SIZE@MPP"
    if cfg.pixels:
        try:
            size, mpp = (float(v) for v in cfg.pixels.split("@"))
        except ValueError as err:
            raise ConfigError(f"pixels {cfg.pixels!r}: expected SIZE@MPP such as 224@0.5", field="pixels") from err
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
        raise ConfigError(f"pixels {pixel.tile_size}@{pixel.target_mpp:g}: its tiles must cover k×k teacher tiles "
                          f"(k >= 2) of {teacher.tile_size}@{teacher.target_mpp:g}, or be the teacher tiling itself",
                          field="pixels")
    if coarse != (cfg.objective == "xmag") and cfg.objective not in BASELINES:
        raise ConfigError(f"pixels {pixel.tile_size}@{pixel.target_mpp:g} with objective {cfg.objective}: "
                          + ("pixels on another tiling pair with k×k teacher tiles; use --objective xmag"
                             if coarse else "xmag needs pixels at a lower magnification than the teacher's"),
                          field="pixels")
    return pixel


def cohort_slides(store: Store, teachers: tuple[str, ...], sets: list[EmbeddingSet], pixels: TilingSpec) -> list[str]:
    """The slides with cached pixels on ``pixels`` and a bag in every teacher set (``sets``, named ``teachers``)."""
    with_pixels = set(store.sql(f"SELECT slide_id FROM slide_tilings WHERE tiling_id = '{pixels.id}' AND pixels")
                      .column("slide_id").to_pylist())
    slide_ids = sorted(with_pixels.intersection(*(set(store.sql(f"SELECT slide_id FROM bags WHERE set_id = '{es.id}'")
                                                        .column("slide_id").to_pylist()) for es in sets)))
    if not slide_ids:
        raise ConfigError(f"{store.root}: no slide has both cached pixels at {pixels.tile_size}@"
                          f"{pixels.target_mpp:g} and embeddings of {', '.join(teachers)}; run fs extract")
    return slide_ids


def weak_labels(store: Store, column: str | None, group: str | None,
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
        raise ConfigError(f"holdout {fraction:g}: the cohort has too few patients per label to hold any out "
                          "(need two in a label); add slides", field="holdout")
    return [s for s in slide_ids if groups[s] not in held], [s for s in slide_ids if groups[s] in held]
