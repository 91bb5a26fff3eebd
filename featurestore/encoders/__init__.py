"""Teacher encoders: a light catalogue of configs, and networks built only when asked for.

``list_teachers()`` and ``teacher_config(name)`` never import torch or a vendor module;
``build_teacher(name)`` imports the one vendor module it needs, resolves the weights (explicit
path, Hugging Face cache or hub, installed package, or a seed for test models) and returns a
``Teacher``: uint8 RGB tiles in, one float32 embedding per tile out. ``teacher_spec(name)`` gives
the ``EncoderSpec`` that build would record, hashing a checkpoint without constructing the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from featurestore.encoders import catalogue as _catalogue  # noqa: F401 - registers the built-in teachers
from featurestore.encoders._config import TeacherConfig
from featurestore.encoders._registry import list_teachers, register_teacher, teacher_config

if TYPE_CHECKING:
    import torch

    from featurestore.encoders._teacher import Teacher, preprocess
    from featurestore.schemas import EncoderSpec

__all__ = ["Teacher", "TeacherConfig", "build_teacher", "list_teachers", "preprocess", "register_teacher",
           "teacher_config", "teacher_spec"]


def build_teacher(name: str, *, weights: str | Path | None = None,
                  device: str | torch.device = "cpu") -> Teacher:
    """Build teacher ``name`` on ``device``, in eval mode; ``weights`` overrides its checkpoint's location."""
    from featurestore.encoders._teacher import build

    return build(name, weights=weights, device=device)


def teacher_spec(name: str, *, weights: str | Path | None = None,
                 device: str | torch.device = "cpu") -> EncoderSpec | None:
    """``build_teacher(name, ...).spec`` without building it; None for seeded weights (only a build can hash them).

    Weights are located as ``build_teacher`` does, so missing weights fail here the same way.
    """
    from featurestore.encoders._teacher import spec

    return spec(name, weights=weights, device=device)


def __getattr__(attr: str) -> Any:
    """``Teacher`` and ``preprocess`` are imported on first use, keeping this package free of torch."""
    if attr in ("Teacher", "preprocess"):
        from featurestore.encoders import _teacher

        return getattr(_teacher, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
