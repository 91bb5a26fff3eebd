"""FEATHER: MIL-Lab's ABMIL (github.com/mahmoodlab/MIL-Lab, ``src/models/abmil.py``, ``abmil/base.yaml``).

``ABMILModel`` wraps ``ABMIL`` as ``model``, so the hub checkpoint's keys start with ``model.``, a
prefix every key shares that the weight reader drops. ``base``: one fc layer (Linear, ReLU, Dropout)
to 512-d, gated attention 512→384→1 head, and the PC-108 classifier the slide embedding does not use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featurestore.encoders.slide._config import SlideEncoderConfig

EMBED, ATTN, HEADS, DROPOUT, PC108 = 512, 384, 1, 0.25, 108


class GlobalGatedAttention(nn.Module):
    def __init__(self, width: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Dropout(DROPOUT))
        self.attention_b = nn.Sequential(nn.Linear(width, hidden), nn.Sigmoid(), nn.Dropout(DROPOUT))
        self.attention_c = nn.Linear(hidden, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention_c(self.attention_a(x) * self.attention_b(x))


class Abmil(nn.Module):
    def __init__(self, in_dim: int, n_classes: int = PC108) -> None:
        super().__init__()
        self.patch_embed = nn.Sequential(nn.Linear(in_dim, EMBED), nn.ReLU(), nn.Dropout(DROPOUT))
        self.global_attn = GlobalGatedAttention(EMBED, ATTN, HEADS)
        self.classifier = nn.Linear(EMBED * HEADS, n_classes)

    def encode(self, features: torch.Tensor, coords: torch.Tensor, patch_size_lv0: int) -> torch.Tensor:
        """``forward_features``: softmax over tiles of each head's score, heads concatenated."""
        h = self.patch_embed(features[None])
        attention = F.softmax(self.global_attn(h).transpose(-2, -1), dim=-1)
        return torch.bmm(attention, h).flatten(1)


def feather(config: SlideEncoderConfig, in_dim: int) -> Abmil:
    return Abmil(in_dim)
