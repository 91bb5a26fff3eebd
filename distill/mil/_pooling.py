"""Baselines and ABMIL: pooled projections of the tiles, differing only in how tiles are weighted."""

from __future__ import annotations

import torch
from torch import Tensor

from featurestore.distill.mil.base import (
    GatedAttention,
    HeadConfig,
    HeadOutput,
    MILHead,
    Readout,
    masked_softmax,
    projection,
)


class _Pooled(MILHead):
    """Projection, a parameter-free pooling in ``forward``, readout: the two baselines' shared layers."""

    def __init__(self, in_dim: int, readout: Readout, cfg: HeadConfig, n_classes: int = 0) -> None:
        super().__init__(in_dim, readout, cfg, n_classes)
        self.embed_dim = cfg.hidden
        self.project = projection(in_dim, cfg)
        self.readout = readout(cfg.hidden)


class MeanPool(_Pooled):
    """Mean of projected tiles: every tile weighs 1/n."""

    def forward(self, x: Tensor, mask: Tensor, coords: Tensor | None = None,
                labels: Tensor | None = None) -> HeadOutput:
        weights = mask.float() / mask.sum(1, keepdim=True)
        z = torch.einsum("bn,bnd->bd", weights.to(x.dtype), self.project(x))
        return HeadOutput(self.readout(z), z, weights)


class MaxPool(_Pooled):
    """Feature-wise max of projected tiles; a tile's attention is the share of features it supplies."""

    def forward(self, x: Tensor, mask: Tensor, coords: Tensor | None = None,
                labels: Tensor | None = None) -> HeadOutput:
        h = self.project(x).masked_fill(~mask[..., None], float("-inf"))
        z, winner = h.max(1)
        share = torch.zeros(mask.shape, device=x.device).scatter_add_(
            1, winner, torch.full(winner.shape, 1.0 / winner.shape[1], device=x.device))
        return HeadOutput(self.readout(z), z, share)


class ABMIL(MILHead):
    """Gated-attention MIL (Ilse et al. 2018): a softmax-weighted mean of projected tiles."""

    def __init__(self, in_dim: int, readout: Readout, cfg: HeadConfig, n_classes: int = 0) -> None:
        super().__init__(in_dim, readout, cfg, n_classes)
        self.embed_dim = cfg.hidden
        self.project = projection(in_dim, cfg)
        self.attention = GatedAttention(cfg.hidden, cfg.attention_dim, cfg.dropout)
        self.readout = readout(cfg.hidden)

    def forward(self, x: Tensor, mask: Tensor, coords: Tensor | None = None,
                labels: Tensor | None = None) -> HeadOutput:
        h = self.project(x)
        a = masked_softmax(self.attention(h), mask)
        z = torch.einsum("bn,bnd->bd", a.to(h.dtype), h)
        return HeadOutput(self.readout(z), z, a)
