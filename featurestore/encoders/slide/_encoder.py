"""``SlideEncoder`` and ``build``: config + network + verified weights → one embedding per slide."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featurestore.encoders._registry import load_entrypoint
from featurestore.encoders._teacher import AUTOCAST
from featurestore.encoders._weights import (
    WeightsFile,
    load_strict,
    locate,
    read_state_dict,
    sha256_file,
    sha256_state_dict,
)
from featurestore.encoders.slide._config import SlideEncoderConfig
from featurestore.encoders.slide.catalogue import slide_encoder_config
from featurestore.schemas import EncoderSpec

NO_PIXELS = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
"""``EncoderSpec`` mean/std of a slide encoder: it reads embeddings, so there is no pixel normalisation."""


class SlideEncoder(nn.Module):
    """A frozen slide encoder: a slide's tile embeddings ``(n, d)`` and level-0 corners ``(n, 2)`` in, ``(dim,)`` out.

    ``network`` has ``encode(features, coords, patch_size_lv0) -> (1, dim)`` (TITAN's call; the other
    vendors' networks ignore the positions) and keeps its vendor's parameter names, so its ``state_dict``
    is the checkpoint's. On a GPU the forward pass autocasts to ``config.dtype`` (the vendor's
    precision); CPUs compute in float32.
    """

    def __init__(self, config: SlideEncoderConfig, network: nn.Module, spec: EncoderSpec,
                 device: torch.device) -> None:
        super().__init__()
        self.config = config
        self.spec = spec
        self.device = device
        self.network = network.to(device)
        self.requires_grad_(False)
        self.eval()

    @torch.inference_mode()
    def forward(self, features: np.ndarray | torch.Tensor, coords: np.ndarray | torch.Tensor,
                patch_size_lv0: int) -> np.ndarray:
        x = torch.as_tensor(np.asarray(features, np.float32), device=self.device)
        xy = torch.as_tensor(np.asarray(coords, np.int64), device=self.device)
        with self._precision(self.device):
            out = self.network.encode(x, xy, int(patch_size_lv0))
        return out.float().cpu().numpy().reshape(-1)

    def _precision(self, device: torch.device) -> contextlib.AbstractContextManager:
        amp = AUTOCAST[self.config.dtype]
        if device.type != "cuda" or amp is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=amp)


def build(name: str, *, in_dim: int, tile_size: int, weights: str | Path | None = None,
          device: str | torch.device = "cpu") -> SlideEncoder:
    """Resolve the weights first (fail fast), construct the network, load strictly, record the sha256.

    ``in_dim`` and ``tile_size`` describe the tile embeddings it will read (checked against the
    encoder's contract by the caller); mean pooling takes its width from them.
    """
    config = slide_encoder_config(name)
    found = locate(config, weights)
    network = load_entrypoint(config.builder)(config, in_dim)
    if found is not None:
        state = read_state_dict(config.name, found.path)
        if config.checkpoint_filter:
            state = load_entrypoint(config.checkpoint_filter)(state, network)
        load_strict(config.name, network, state, found.source)
    target = torch.device(device)
    return SlideEncoder(config, network, _spec(config, found, in_dim, tile_size, target), target)


def spec(name: str, *, in_dim: int, tile_size: int, weights: str | Path | None = None,
         device: str | torch.device = "cpu") -> EncoderSpec:
    """``build(...).spec`` without constructing the network: a checkpoint is identified by its file's sha256."""
    config = slide_encoder_config(name)
    return _spec(config, locate(config, weights), in_dim, tile_size, torch.device(device))


def _spec(config: SlideEncoderConfig, found: WeightsFile | None, in_dim: int, tile_size: int,
          device: torch.device) -> EncoderSpec:
    """The one place a slide encoder's ``EncoderSpec`` is made; an encoder without weights hashes as an empty one."""
    digest, source = (sha256_state_dict({}), "none") if found is None else (sha256_file(found.path), found.source)
    return EncoderSpec(name=config.name, version=config.version, weights_sha256=digest,
                       embed_dim=config.embed_dim or in_dim, input_size=tile_size, mean=NO_PIXELS[0],
                       std=NO_PIXELS[1], pooling="mean" if found is None else "pooler",
                       dtype=config.dtype if device.type == "cuda" else "float32", source=source,
                       license=config.license)
