"""Slide encoders: a catalogue of configs (no torch to list them), networks built only when asked for.

``build_slide_encoder(name, in_dim=..., tile_size=...)`` imports the one vendor module it needs,
resolves its weights as teachers' are (``--weights`` path, Hugging Face cache or hub) and returns a
``SlideEncoder``: a slide's tile embeddings and level-0 coordinates in, one float32 vector out.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from featurestore.encoders.slide._config import SlideEncoderConfig, TileContract
from featurestore.encoders.slide.catalogue import list_slide_encoders, slide_encoder_config

if TYPE_CHECKING:
    import torch

    from featurestore.encoders.slide._encoder import SlideEncoder
    from featurestore.schemas import EncoderSpec

__all__ = ["SlideEncoderConfig", "TileContract", "build_slide_encoder", "list_slide_encoders",
           "slide_encoder_config", "slide_encoder_spec"]


def build_slide_encoder(name: str, *, in_dim: int, tile_size: int, weights: str | Path | None = None,
                        device: str | torch.device = "cpu") -> SlideEncoder:
    """Build slide encoder ``name`` for tile embeddings of width ``in_dim`` cut at ``tile_size`` px."""
    from featurestore.encoders.slide._encoder import build

    return build(name, in_dim=in_dim, tile_size=tile_size, weights=weights, device=device)


def slide_encoder_spec(name: str, *, in_dim: int, tile_size: int, weights: str | Path | None = None,
                       device: str | torch.device = "cpu") -> EncoderSpec:
    """The ``EncoderSpec`` ``build_slide_encoder`` would record, without building (weights located the same way)."""
    from featurestore.encoders.slide._encoder import spec

    return spec(name, in_dim=in_dim, tile_size=tile_size, weights=weights, device=device)
