"""What ``fs distill`` accepts (``DistillConfig``, checked when built) and what it returns (``DistillResult``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from featurestore.distill.errors import ConfigError
from featurestore.distill.kd.data import Augment
from featurestore.distill.kd.objectives import OBJECTIVES, ObjectiveConfig

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
