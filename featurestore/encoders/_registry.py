"""Teacher names → frozen configs, in the manner of timm's model registry.

Entry points only return configs; the vendor module that builds the network is named by a
``module:function`` string and imported when that teacher is built, so listing or naming
teachers never imports torch or another vendor's code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from featurestore.encoders._config import TeacherConfig
from featurestore.schemas.errors import ModelError

_CONFIGS: dict[str, TeacherConfig] = {}
_RESOLVERS = {
    "timm:": "featurestore.encoders.generic:timm_config",
    "local:": "featurestore.encoders.generic:local_config",
    "student:": "featurestore.encoders.student:student_config",
}


def register_teacher(config: TeacherConfig) -> TeacherConfig:
    """Add a teacher under ``config.name``; registering an identical config again is harmless."""
    if config.name.startswith(tuple(_RESOLVERS)):
        raise ModelError(f"teacher name {config.name!r} uses a reserved prefix (timm:, local:, student:); "
                         "choose another name")
    known = _CONFIGS.get(config.name)
    if known is not None and known != config:
        raise ModelError(f"teacher {config.name!r} is already registered with a different config; "
                         "choose another name")
    _CONFIGS[config.name] = config
    return config


def entrypoint(fn: Callable[[], TeacherConfig]) -> Callable[[], TeacherConfig]:
    """Decorator registering the config an entry-point function returns (timm's ``@register_model``)."""
    register_teacher(fn())
    return fn


def list_teachers() -> list[str]:
    """Registered teacher names; ``timm:<arch>``, ``local:<checkpoint>`` and ``student:<run_dir>`` are accepted
    besides these."""
    return sorted(_CONFIGS)


def teacher_config(name: str) -> TeacherConfig:
    """The config registered as ``name``, or one resolved from a ``timm:`` / ``local:`` / ``student:`` name."""
    if name in _CONFIGS:
        return _CONFIGS[name]
    for prefix, resolver in _RESOLVERS.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return load_entrypoint(resolver)(name.removeprefix(prefix))
    raise ModelError(f"unknown teacher {name!r}; choose one of {', '.join(list_teachers())}, "
                     "timm:<arch>, local:<checkpoint> or student:<run_dir>")


def load_entrypoint(ref: str) -> Callable[..., Any]:
    """Import the function named by ``module:function`` now, and only now."""
    module, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ModelError(f"cannot import {ref} ({err}); fix the teacher config's builder or "
                         "checkpoint_filter") from err
