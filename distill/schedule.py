"""How stage-two models are trained: the records every trainer nests, their one validator, and each
command's defaults.

``Schedule`` is what every trainer has (``fs train``, ``fs distill-slides``, ``fs amkd`` and the tile
students of ``fs distill``): AdamW epochs, learning rate, weight decay, batch size, device, and the
labels column that keeps one patient's slides on one side of every split. ``CrossValidation`` is
what the cross-validated slide heads add: folds × seeds, the inner validation share that early
stopping watches, patience, and the tile cap of training bags. The tile students have no folds, so
they nest a ``Schedule`` only.

The defaults of each command live here, once: the configs take them as their defaults and the CLI
reads its option defaults from them. Override a field with ``dataclasses.replace(TRAIN, epochs=8)``.
Messages name fields as Python does (``lr must be > 0``); the CLI shows them as flags. Importing
this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from featurestore.devices import check_device
from featurestore.distill.errors import ConfigError, require

_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epochs": (lambda v: v >= 0, "must be >= 0"),
    "lr": (lambda v: v > 0, "must be > 0"),
    "weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "batch_size": (lambda v: v >= 1, "must be >= 1"),
    "group": (lambda v: v is None or (isinstance(v, str) and v.strip() != ""), "must be a labels column or None"),
    "folds": (lambda v: v >= 2, "must be >= 2 (a fixed split column replaces k-fold)"),
    "seeds": (lambda v: v >= 1, "must be >= 1"),
    "val_fraction": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "patience": (lambda v: v >= 1, "must be >= 1"),
    "max_tiles": (lambda v: v is None or v >= 1, "must be >= 1, or None for every tile"),
    "window": (lambda v: v >= 1, "must be >= 1"),
}


def _validate(record: Schedule | CrossValidation) -> None:
    for f in fields(record):
        value = getattr(record, f.name)
        if f.name == "device":
            check_device(value)
            continue
        ok, rule = _RULES[f.name]
        try:
            passed = ok(value)
        except TypeError as err:
            raise ConfigError(f"{f.name} {rule}, got {value!r}", field=f.name) from err
        require(passed, f.name, f"{rule}, got {value!r}")


@dataclass(frozen=True)
class Schedule:
    """AdamW for ``epochs`` passes (0: the untrained model is evaluated, as a reference) over
    ``batch_size`` items a step on ``device`` (auto, cpu or cuda[:N]); ``group`` is the labels column
    keeping one patient's slides together in every split (None: each slide on its own)."""

    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    device: str = "auto"
    group: str | None = "patient"

    def __post_init__(self) -> None:
        _validate(self)

    def require_batch(self, minimum: int, why: str) -> None:
        """Objectives that compare the items of a batch need ``minimum`` of them."""
        require(self.batch_size >= minimum, "batch_size", f"must be >= {minimum} ({why})")


@dataclass(frozen=True)
class CrossValidation:
    """``folds`` patient-grouped stratified folds, repeated with ``seeds`` different splits and
    initialisations. ``val_fraction`` of each fold's training patients form the validation split whose
    loss picks the best epoch (0: no early stopping, the last epoch is kept); training stops after
    ``patience`` epochs without improvement. ``max_tiles`` caps the tiles of a training bag (a fresh
    random subset each epoch; None: all); validation and test bags are always whole. With ``window`` > 1
    the best epoch is where the validation loss averaged over ``window`` consecutive epochs is lowest,
    and the kept weights are the average of those epochs' weights (``distill.fit``)."""

    folds: int
    seeds: int
    max_tiles: int | None
    val_fraction: float = 0.2
    patience: int = 10
    window: int = 1

    def __post_init__(self) -> None:
        _validate(self)


# Each command's defaults. CLAM-size heads on whole cohorts train longer than the small students of
# the cross-cohort and AMKD studies; the tile students take many small steps. fs train's lr is 1e-3,
# not CLAM's 2e-4: a cohort of a few dozen slides gives a handful of steps per epoch, and at 2e-4 the
# attention had barely left its initial state when early stopping ended training (a generated
# 96-slide cohort with local signal: ABMIL 0.44 AUROC at 2e-4, 0.74 at 1e-3; docs/mil-heads.md).
TRAIN = Schedule(epochs=50, lr=1e-3, weight_decay=1e-4, batch_size=8)
TRAIN_CV = CrossValidation(folds=5, seeds=1, max_tiles=4096)
SLIDES = Schedule(epochs=40, lr=5e-4, weight_decay=1e-4, batch_size=8)
SLIDES_CV = CrossValidation(folds=3, seeds=5, max_tiles=512)
AMKD = Schedule(epochs=40, lr=1e-3, weight_decay=1e-4, batch_size=16)
AMKD_CV = CrossValidation(folds=3, seeds=3, max_tiles=256)
KD = Schedule(epochs=10, lr=1e-3, weight_decay=0.05, batch_size=64)
