"""What ``fs distill`` accepts (``DistillConfig``, checked when built) and what it returns (``DistillResult``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from featurestore.distill.errors import require
from featurestore.distill.kd.data import Augment
from featurestore.distill.kd.objectives import OBJECTIVES, ObjectiveConfig
from featurestore.distill.schedule import KD, Schedule

Progress = Callable[[str], None]


@dataclass(frozen=True)
class DistillConfig:
    """Everything ``fs distill`` accepts; the resolved copy is saved as ``RUN_DIR/config.json``.

    ``schedule`` (``distill.schedule``): AdamW for ``epochs`` under linear warm-up and cosine decay (0
    evaluates the untrained student: the from-scratch starting point, as a reference), ``batch_size``
    tiles a step, the device, and ``group``, the labels column keeping a patient's slides on one side
    of the hold-out. ``pixels`` (``SIZE@MPP``) picks the cached tiling the student sees: by default the
    teacher tiling, or for ``xmag`` the cached coarser tiling. ``input_size`` is the student's input
    (tiles are resized to it). ``tiles_per_slide`` units per slide per epoch (0: the median slide's
    count; units are tiles, or region×region neighbourhoods for ``relational``). ``holdout`` is the
    share of patients held out. ``label`` names the slide label broadcast to tiles as weak labels
    (probes, ``logit``'s CE term, ``supervised``). The from-scratch baselines (``supervised``,
    ``simsiam``) use their teacher only to pair tiles and to be evaluated against it. ``standardize``
    trains against centred, scaled targets (``TargetScaling``). ``split_seed`` draws the held-out
    patients apart from ``seed``, so runs with different seeds are measured on the same slides.
    ``downstream_folds`` (0: skip) cross-validates ``fs train``'s default ABMIL head on ``label`` over
    every slide, once on the student's embeddings of the cached pixels and once on the primary
    teacher's bags.
    """

    store: Path
    teachers: tuple[str, ...]
    student: str
    objective: str
    out: Path
    pixels: str | None = None
    input_size: int = 112
    schedule: Schedule = KD
    tiles_per_slide: int = 0
    holdout: float = 0.25
    label: str | None = "label"
    seed: int = 0
    split_seed: int = 0
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
        require(self.objective in OBJECTIVES, "objective", f"must be one of {', '.join(OBJECTIVES)}, "
                f"got {self.objective!r}")
        self.schedule.require_batch(2, "batch statistics need two tiles")
        require(self.input_size >= 16, "input_size", "must be >= 16")
        require(0 < self.holdout < 1, "holdout", "must be in (0, 1)")
        require(self.region >= 2, "region", "must be >= 2")
        require(self.tiles_per_slide >= 0, "tiles_per_slide", "must be >= 0")
        require(self.cache_gb > 0, "cache_gb", "must be > 0")
        require(self.downstream_folds == 0 or self.downstream_folds >= 2, "downstream_folds", "must be 0 or >= 2")
        require(bool(self.teachers), "teachers", "must name at least one embedding set (baselines use it only for "
                "evaluation)")
        require(self.objective != "logit" or self.teacher_head is not None, "teacher_head",
                "is needed by objective logit: a linear head file or an fs train run directory")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return out | {"store": str(self.store.resolve()), "out": str(self.out.resolve()),
                      "teachers": list(self.teachers), "schedule": asdict(self.schedule),
                      "augment": None if self.augment is None else asdict(self.augment),
                      "objective_cfg": asdict(self.objective_cfg),
                      "teacher_head": None if self.teacher_head is None else str(self.teacher_head)}


@dataclass(frozen=True)
class DistillResult:
    run_dir: Path
    run_id: str
    report: dict[str, Any]
