"""Students: any timm architecture, trained from scratch and exported as ``student:RUN_DIR`` encoders."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from featurestore.distill.errors import ConfigError
from featurestore.distill.kd.objectives import StudentOutput
from featurestore.encoders.student import SIDECAR, WEIGHTS, StudentEncoder


@dataclass(frozen=True)
class StudentSpec:
    """The architecture and preprocessing of a student; ``kwargs`` go to ``timm.create_model``."""

    arch: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    kwargs: tuple[tuple[str, Any], ...] = ()


def create_student(arch: str, input_size: int) -> tuple[nn.Module, StudentSpec]:
    """``timm.create_model(arch, pretrained=False, num_classes=0)``; ViT-like models get ``img_size=input_size``.

    Mean and std are the architecture's own (timm's pretrained config), as its recipe expects.
    """
    try:
        with torch.device("meta"):
            probe = timm.create_model(arch, pretrained=False, num_classes=0)
    except RuntimeError as err:
        raise ConfigError(f"student {arch}: timm {timm.__version__} has no architecture {arch!r}; pick one "
                          "from timm.list_models()", field="student") from err
    kwargs = {"img_size": input_size} if hasattr(probe, "patch_embed") else {}
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    except (RuntimeError, TypeError, AssertionError) as err:
        raise ConfigError(f"student {arch}: cannot build it at input_size {input_size} ({err}); "
                          "choose another input size", field="student") from err
    cfg = model.pretrained_cfg
    return model, StudentSpec(arch, input_size, tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                              tuple(cfg.get("std", (0.229, 0.224, 0.225))), tuple(sorted(kwargs.items())))


def _feature_map(features: Tensor, backbone: nn.Module) -> Tensor:
    """(B, C, h, w) from a CNN's map (NCHW or NHWC) or a ViT's tokens (prefix tokens dropped)."""
    if features.ndim == 4:
        return features.permute(0, 3, 1, 2) if getattr(backbone, "output_fmt", "NCHW") == "NHWC" else features
    tokens = features[:, getattr(backbone, "num_prefix_tokens", 0):]
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ConfigError(f"student {type(backbone).__name__}: {tokens.shape[1]} patch tokens do not form a square "
                          "grid; choose a square input size")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


class Student(nn.Module):
    """A timm backbone that returns both its pooled embedding and its spatial feature map.

    The embedding is ``forward_head(forward_features(x), pre_logits=True)``, which is what the
    headless model's ``forward`` returns, so the exported encoder computes the same vector.
    """

    def __init__(self, backbone: nn.Module, spec: StudentSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.dim = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():
            self.channels = self(torch.zeros(1, 3, spec.input_size, spec.input_size)).feature_map.shape[1]
        backbone.train(was_training)

    def forward(self, x: Tensor) -> StudentOutput:
        features = self.backbone.forward_features(x)
        embedding = self.backbone.forward_head(features, pre_logits=True)
        return StudentOutput(embedding, _feature_map(features, self.backbone))


def export_encoder(student: Student, projection: nn.Linear | None) -> StudentEncoder:
    """A copy of the student (and of the objective's projection head) as the encoder ``student:RUN_DIR`` rebuilds."""
    encoder = StudentEncoder(copy.deepcopy(student.backbone), projection.out_features if projection else None)
    if projection is not None:
        encoder.projection.load_state_dict(projection.state_dict())
    return encoder.eval()


def save_student(run_dir: Path, encoder: StudentEncoder, spec: StudentSpec, *, name: str, tile_size: int,
                 mpp: float, version: str) -> None:
    """Write ``student.safetensors`` and ``student.json`` (see ``featurestore.encoders.student``)."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in encoder.state_dict().items()}
    save_file(state, run_dir / WEIGHTS)
    sidecar = {"name": name, "arch": spec.arch, "kwargs": dict(spec.kwargs), "input_size": spec.input_size,
               "mean": list(spec.mean), "std": list(spec.std),
               "projection": encoder.projection.out_features if encoder.projection is not None else None,
               "embed_dim": encoder.num_features, "tile_size": tile_size, "mpp": mpp, "version": version}
    (run_dir / SIDECAR).write_text(json.dumps(sidecar, indent=1) + "\n")
