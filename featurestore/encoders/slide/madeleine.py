"""MADELEINE's H&E slide encoder (github.com/mahmoodlab/MADELEINE, ``madeleine/models/Model.py``, ``abmil.py``).

``encode_he``: a shared pre-attention MLP (3 × Linear, LayerNorm, GELU) widens each 512-d CONCH v1
tile to 4 heads × 512; each head's gated ABMIL softmax-weights its slice over the tiles; the heads'
sums are concatenated and projected to 512. ``token_projector`` serves the pretraining's local loss
only and is loaded for the strict check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featurestore.encoders.slide._config import SlideEncoderConfig

HIDDEN, ATTN, HEADS, TOKENS = 512, 512, 4, 128


class BatchedAbmil(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Dropout(0.25))
        self.attention_b = nn.Sequential(nn.Linear(width, hidden), nn.Sigmoid(), nn.Dropout(0.25))
        self.attention_c = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax over the tiles (dim 1) of ``x`` (batch, tiles, width)."""
        return F.softmax(self.attention_c(self.attention_a(x) * self.attention_b(x)), dim=1)


class AbmilEmbedder(nn.Module):
    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.pre_attn = nn.Sequential(
            nn.Linear(in_dim, HIDDEN), nn.LayerNorm(HIDDEN), nn.GELU(), nn.Dropout(0.1),
            nn.Linear(HIDDEN, HIDDEN), nn.LayerNorm(HIDDEN), nn.GELU(), nn.Dropout(0.1),
            nn.Linear(HIDDEN, HIDDEN * HEADS), nn.LayerNorm(HIDDEN * HEADS), nn.GELU(), nn.Dropout(0.1))
        self.attn = nn.ModuleList(BatchedAbmil(HIDDEN, ATTN) for _ in range(HEADS))

    def forward(self, bags: torch.Tensor) -> torch.Tensor:
        """(batch, tiles, in_dim) → (batch, HIDDEN, HEADS); the vendor's ``rearrange('b t (e c) -> b t e c')``."""
        embeddings = self.pre_attn(bags).unflatten(-1, (HIDDEN, HEADS))
        attention = torch.stack([net(embeddings[..., i]) for i, net in enumerate(self.attn)], dim=-1)
        return (embeddings * attention).sum(dim=1)


class Madeleine(nn.Module):
    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.wsi_embedders = AbmilEmbedder(in_dim)
        self.token_projector = nn.Linear(ATTN * HEADS, TOKENS)
        self.projector = nn.Linear(ATTN * HEADS, ATTN)

    def encode(self, features: torch.Tensor, coords: torch.Tensor, patch_size_lv0: int) -> torch.Tensor:
        slide = self.wsi_embedders(features[None])
        return self.projector(slide.flatten(1))


def madeleine(config: SlideEncoderConfig, in_dim: int) -> Madeleine:
    return Madeleine(in_dim)
