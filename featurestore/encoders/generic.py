"""Any timm architecture (``timm:<arch>``), and local checkpoints with a sidecar JSON (``local:<path>``).

``timm:<arch>`` takes timm's own pretrained-config preprocessing and the architecture's pooled
features (``num_classes=0``); its weights are seeded unless ``weights=`` names a file.

``local:/models/my_vit.safetensors`` reads ``/models/my_vit.json`` next to it::

    {
      "arch": "vit_small_patch16_224",   timm architecture                          (required)
      "embed_dim": 384,                  width of the pooled embedding, checked     (required)
      "input_size": 224,                 crop fed to the network                    (required)
      "mean": [0.485, 0.456, 0.406],     normalisation of [0, 1] pixels             (required)
      "std": [0.229, 0.224, 0.225],                                                 (required)
      "resize_to": 256,                  shorter side before the crop      (default input_size)
      "interpolation": "bicubic",        bilinear or bicubic                  (default bicubic)
      "pooling": "cls",                  cls, mean, cls+mean or pooler         (default pooler)
      "kwargs": {"img_size": 224},       more timm.create_model arguments, plain JSON values
      "name": "my-vit", "version": "3", "license": "CC-BY-4.0"    (name defaults to local:<stem>)
    }

The checkpoint is a state dict (``.safetensors``, ``.bin``, ``.pth`` or ``.pt``) for
``timm.create_model(arch, num_classes=0, **kwargs)``; classifier weights in it are ignored.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from featurestore.encoders._config import TeacherConfig
from featurestore.schemas.errors import ModelError

BUILDER = "featurestore.encoders.generic:timm_backbone"
FILTER = "featurestore.encoders.generic:drop_classifier"
_REQUIRED = ("arch", "embed_dim", "input_size", "mean", "std")
_OPTIONAL = ("resize_to", "interpolation", "pooling", "kwargs", "name", "version", "license")


def timm_config(arch: str) -> TeacherConfig:
    """Config of ``timm:<arch>``, read off the architecture built on the meta device (no memory)."""
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, num_classes=0)
    except RuntimeError as err:
        raise ModelError(f"timm:{arch}: timm {timm.__version__} has no architecture {arch!r}; pick one from "
                         "timm.list_models()") from err
    cfg = model.pretrained_cfg
    size = cfg["input_size"][-1]
    return TeacherConfig(
        name=f"timm:{arch}", builder=BUILDER,
        embed_dim=getattr(model, "head_hidden_size", None) or model.num_features, input_size=size,
        resize_to=math.floor(size / cfg["crop_pct"]), interpolation=cfg["interpolation"],
        mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), pooling="pooler", checkpoint_filter=FILTER,
        license=cfg.get("license") or "", version=f"timm-{timm.__version__}", arch=arch)


def read_json_config(name: str, path: Path, required: tuple[str, ...], optional: tuple[str, ...],
                     fix: str) -> dict[str, Any]:
    """A JSON object with exactly these keys (all of ``required``); one-line errors name ``path`` and the fix."""
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{name}: {path} is not readable JSON ({err}); {fix}") from err
    missing = [k for k in required if k not in spec] if isinstance(spec, dict) else list(required)
    unknown = sorted(set(spec) - set(required) - set(optional)) if isinstance(spec, dict) else []
    if missing or unknown:
        raise ModelError(f"{name}: {path} lacks {missing} or has unknown keys {unknown}; "
                         f"allowed keys are {', '.join(required + optional)}")
    return spec


def local_config(location: str) -> TeacherConfig:
    """Config of ``local:<checkpoint>`` from the sidecar ``<checkpoint stem>.json`` described above."""
    path = Path(location).expanduser()
    sidecar = path.with_suffix(".json")
    if not path.is_file():
        raise ModelError(f"local:{location}: checkpoint {path} does not exist; give the path of a "
                         "state-dict file")
    if not sidecar.is_file():
        raise ModelError(f"local:{location}: no sidecar config {sidecar}; write one with "
                         f"{', '.join(_REQUIRED)} (see featurestore.encoders.generic)")
    spec = read_json_config(f"local:{location}", sidecar, _REQUIRED, _OPTIONAL, "fix the file")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.get("kwargs", {}).items()}
    return TeacherConfig(
        name=spec.get("name", f"local:{path.stem}"), builder=BUILDER, embed_dim=int(spec["embed_dim"]),
        input_size=int(spec["input_size"]), resize_to=spec.get("resize_to"),
        interpolation=spec.get("interpolation", "bicubic"), mean=tuple(spec["mean"]), std=tuple(spec["std"]),
        pooling=spec.get("pooling", "pooler"), weights_filename=str(path.resolve()), checkpoint_filter=FILTER,
        license=spec.get("license", ""), version=str(spec.get("version", "1")), arch=spec["arch"],
        arch_kwargs=tuple(sorted(kwargs.items())))


def timm_backbone(config: TeacherConfig) -> nn.Module:
    """``timm.create_model(arch, num_classes=0, **arch_kwargs)``, never downloading anything."""
    try:
        return timm.create_model(config.arch, pretrained=False, num_classes=0, **dict(config.arch_kwargs))
    except (RuntimeError, TypeError) as err:
        raise ModelError(f"{config.name}: timm cannot build {config.arch!r} with "
                         f"{dict(config.arch_kwargs)} ({err}); fix arch or kwargs") from err


def drop_classifier(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Drop classifier weights the headless model has no place for, as timm's ``load_pretrained`` does."""
    head = model.pretrained_cfg.get("classifier") or ()
    heads = (head,) if isinstance(head, str) else tuple(head)
    keys = model.state_dict().keys()
    absent = tuple(f"{h}." for h in heads if not any(k.startswith(f"{h}.") for k in keys))
    return {k: v for k, v in state.items() if not (absent and k.startswith(absent))}
