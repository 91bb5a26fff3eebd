"""Options the training commands share (``fs train``, ``fs distill-slides``, ``fs amkd``, ``fs distill``,
and ``--device`` of ``fs extract``), and the one place field-named library errors become flag-named.

Defaults come from ``featurestore.distill.schedule``, each command's, so the library and the CLI cannot
disagree. Names chosen from a library registry (heads, objectives, tasks, losses) are passed through as
text and checked by the library, which lists the valid ones; importing the registries here would load
torch for every ``fs`` command.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer

from featurestore.devices import DEVICE_NAMES
from featurestore.schemas import FsError

TaskKind = Annotated[str, typer.Option(help="Task: what the label is (an unknown name lists the choices).")]
Device = Annotated[str, typer.Option(help=f"Where to run: {DEVICE_NAMES}.")]
Folds = Annotated[int, typer.Option(help="Cross-validation folds.")]
Seeds = Annotated[int, typer.Option(help="Repeats with different splits and initialisations.")]
Group = Annotated[str, typer.Option(help="Labels column grouping one patient's slides; 'none' to split by slide.")]
ValFraction = Annotated[float, typer.Option(help="Share of training patients for model selection.")]
Epochs = Annotated[int, typer.Option(help="Maximum epochs; 0 evaluates the untrained model (a reference).")]
Patience = Annotated[int, typer.Option(help="Epochs without validation improvement before stopping.")]
Lr = Annotated[float, typer.Option(help="AdamW learning rate (fs distill: the peak of its cosine schedule).")]
WeightDecay = Annotated[float, typer.Option(help="AdamW weight decay.")]
BatchSize = Annotated[int, typer.Option(help="Items per step: bags (Cox: 16 or more), or tiles for fs distill.")]
MaxTiles = Annotated[int, typer.Option(help="Random tiles per training bag; 0 for all.")]
Out = Annotated[Path, typer.Option(help="New run directory (must not exist or be empty).")]
OptionalOut = Annotated[Path | None, typer.Option(help="New run directory for config, metrics and predictions.")]


def registry_name(what: str) -> str:
    """Help for an option taking a registry name: the library checks it and lists the valid ones."""
    return f"{what} (an unknown name lists the choices)."


def group_column(value: str) -> str | None:
    """``--group none`` splits by slide."""
    return None if value.lower() == "none" else value


P = ParamSpec("P")
R = TypeVar("R")


def field_flags(fn: Callable[P, R]) -> Callable[P, R]:
    """Show a library error about a config field (``lr must be > 0``) with that field's flag (``--lr must be
    > 0``): the library speaks to Python callers, the command to people typing flags."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except FsError as err:
            field, message = getattr(err, "field", None), str(err)
            if not field or not message.startswith(field):
                raise
            raise type(err)("--" + field.replace("_", "-") + message[len(field):]) from err

    return wrapper
