"""The ``Teacher`` module and ``build``: config + backbone + verified weights → one embedding per tile."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from featurestore.encoders._config import TeacherConfig
from featurestore.encoders._registry import load_entrypoint, teacher_config
from featurestore.encoders._weights import (
    load_strict,
    locate,
    read_state_dict,
    sha256_file,
    sha256_state_dict,
)
from featurestore.schemas import EncoderSpec
from featurestore.schemas.errors import ModelError

AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The autocast dtype of each model precision a config may name (None: run in float32)."""


class Teacher(nn.Module):
    """A frozen teacher: uint8 RGB tiles ``(n, h, w, 3)`` in, ``(n, embed_dim)`` float32 out.

    The vendor's preprocessing runs on the teacher's device, so tiles can be shipped as uint8
    (a quarter of the bytes of float32). The backbone keeps its vendor's parameter names, so its
    ``state_dict`` is the checkpoint's. On a GPU the forward pass autocasts to ``config.dtype``,
    overriding any autocast the caller opened, so each teacher runs at its own precision. Outputs
    are inference-mode tensors: ``clone()`` one before using it as a target in an autograd graph.
    """

    def __init__(self, config: TeacherConfig, backbone: nn.Module, spec: EncoderSpec) -> None:
        super().__init__()
        width = _pooled_width(config, backbone)
        if width != config.embed_dim:
            raise ModelError(f"{config.name}: {config.pooling} pooling of this backbone gives {width}-d "
                             f"embeddings but the config says embed_dim={config.embed_dim}; fix embed_dim or "
                             "pooling")
        self.config = config
        self.spec = spec
        self.backbone = backbone
        self.requires_grad_(False)
        self.eval()

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """The vendor's preprocessing (see ``preprocess``), run on this teacher's device."""
        device = next(self.backbone.parameters()).device
        return preprocess(pixels.to(device, non_blocking=True), self.config)

    @torch.inference_mode()
    def embed_preprocessed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone and pooling only, for inputs already preprocessed (benchmarks, cached crops)."""
        with self._precision(x.device):
            if self.config.pooling == "pooler":
                out = self.backbone(x)
            else:
                out = _pool(self.backbone.forward_features(x), self.config.pooling, self.backbone)
        return out.float()

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embed_preprocessed(self.preprocess(pixels))

    def _precision(self, device: torch.device) -> contextlib.AbstractContextManager:
        if device.type != "cuda":
            return contextlib.nullcontext()
        amp = AUTOCAST[self.config.dtype]
        return torch.autocast("cuda", dtype=amp, enabled=amp is not None)


def preprocess(pixels: torch.Tensor, config: TeacherConfig) -> torch.Tensor:
    """uint8 ``(n, h, w, 3)`` → normalised float ``(n, 3, S, S)``, channels-last, on the pixels' device.

    Reproduces the vendors' ``Resize(resize_to)`` + ``CenterCrop(input_size)`` on PIL images, then
    ``ToTensor`` + ``Normalize(mean, std)``, to within a grey level or two of the resized image.
    """
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ModelError(f"{config.name}: expected uint8 RGB tiles shaped (n, h, w, 3), got {pixels.dtype} "
                         f"{tuple(pixels.shape)}; pass tile pixels as read from the slide")
    # Converted before the permute: casting the (n, h, w, 3) array as laid out is several times faster.
    x = pixels.float().permute(0, 3, 1, 2)
    x = _center_crop(_resize_shorter_side(x, config.resize_to, config.interpolation), config.input_size)
    return _normalise_(x.contiguous(memory_format=torch.channels_last), config)


def _normalise_(x: torch.Tensor, config: TeacherConfig) -> torch.Tensor:
    """``(x - 255 mean) / (255 std)`` in place on a channels-last float batch, as rows of ``w × 3`` values.

    Broadcasting the 3-channel mean over the innermost dimension of size 3 does not vectorise; repeated
    along a whole image row it does, with the same per-element arithmetic (bit-identical, ~2.5× faster).
    """
    n, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).view(n * h, w * c)
    mean = (torch.tensor(config.mean, device=x.device) * 255).repeat(w)
    std = (torch.tensor(config.std, device=x.device) * 255).repeat(w)
    rows.sub_(mean).div_(std)
    return x


def _pool(tokens: torch.Tensor, pooling: str, backbone: nn.Module) -> torch.Tensor:
    """Class token, patch-token mean (registers excluded) or both; a CNN's feature map is averaged."""
    if tokens.ndim == 4:
        return tokens.mean((2, 3))
    if pooling == "cls":
        return tokens[:, 0]
    patches = tokens[:, backbone.num_prefix_tokens:].mean(1)
    return patches if pooling == "mean" else torch.cat([tokens[:, 0], patches], dim=-1)


def _pooled_width(config: TeacherConfig, backbone: nn.Module) -> int:
    if config.pooling == "pooler":
        return getattr(backbone, "head_hidden_size", None) or backbone.num_features
    if config.pooling != "mean" and not hasattr(backbone, "num_prefix_tokens"):
        raise ModelError(f"{config.name}: {config.pooling} pooling needs a transformer with a class token; "
                         "use mean or pooler for this backbone")
    return backbone.num_features * (2 if config.pooling == "cls+mean" else 1)


def _resize_shorter_side(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """torchvision ``Resize(size)`` of a PIL image, on 0..255 floats: shorter side to ``size``.

    PIL resamples width then height and rounds to uint8 in between; doing the same keeps bicubic
    results within one grey level of the vendors' PIL pipelines (a single 2-D pass is off by up to 11).
    """
    h, w = x.shape[-2:]
    if min(h, w) == size:
        return x
    new_long = int(size * max(h, w) / min(h, w))
    out_h, out_w = (size, new_long) if h <= w else (new_long, size)
    if out_w != w:
        x = _resample(x, (h, out_w), mode)
    if out_h != h:
        x = _resample(x, (out_h, out_w), mode)
    return x


def _resample(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    x = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
    return x.clamp_(0, 255).round_()


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision ``CenterCrop(size)``, including its rounding of odd margins."""
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def build(name: str, *, weights: str | Path | None, device: str | torch.device) -> Teacher:
    """Resolve the weights first (fail fast), construct the backbone, load strictly, record the sha256."""
    config = teacher_config(name)
    target = torch.device(device)
    found = locate(config, weights)
    make = load_entrypoint(config.builder)
    if found is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            backbone = make(config)
        digest, source = sha256_state_dict(backbone.state_dict()), f"seed:{config.seed}"
    else:
        backbone = make(config)
        state = read_state_dict(config.name, found.path)
        if config.checkpoint_filter:
            state = load_entrypoint(config.checkpoint_filter)(state, backbone)
        load_strict(config.name, backbone, state, found.source)
        digest, source = sha256_file(found.path), found.source
    teacher = Teacher(config, backbone, _spec(config, digest, source, target))
    if target.type == "cuda":
        teacher.backbone.to(memory_format=torch.channels_last)
    return teacher.to(target)


def spec(name: str, *, weights: str | Path | None, device: str | torch.device) -> EncoderSpec | None:
    """``build(name, ...).spec`` without constructing the network, or None when only building can tell.

    A checkpoint file is identified by its sha256, so hashing it is enough. Seeded weights are
    identified by the hash of the generated tensors, which exist only once the backbone is built.
    """
    config = teacher_config(name)
    found = locate(config, weights)
    if found is None:
        return None
    return _spec(config, sha256_file(found.path), found.source, torch.device(device))


def _spec(config: TeacherConfig, digest: str, source: str, device: torch.device) -> EncoderSpec:
    """The one place an ``EncoderSpec`` is made, shared by ``build`` and ``spec`` so the two always agree."""
    return EncoderSpec(name=config.name, version=config.version, weights_sha256=digest,
                       embed_dim=config.embed_dim, input_size=config.input_size, mean=config.mean,
                       std=config.std, pooling=config.pooling,
                       dtype=config.dtype if device.type == "cuda" else "float32", source=source,
                       license=config.license)
