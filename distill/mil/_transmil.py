"""TransMIL (Shao et al. 2021): two Nyström-attention layers around a positional convolution (PPEG).

Two changes from the reference code, both so that results depend only on a bag's own tiles:
- PPEG convolves tokens placed at their *real* tile-grid positions (from tile coordinates), where
  the original folds the sequence into an arbitrary square; empty grid cells are zero.
- Nyström landmarks are segment means over a bag's real tiles only, with min(landmarks, n)
  segments, and the pseudo-inverse's initial scaling is computed per bag and head. The reference
  pads the sequence to a multiple of the landmark count and scales by a batch-wide maximum, so a
  bag's output there changes with the padding and with its batch-mates.
The attention core runs in float32 even under AMP: the iterative pseudo-inverse is not stable in
half precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featurestore.distill.mil.base import HeadConfig, HeadOutput, MILHead, Readout, projection


def iterative_pinv(x: Tensor, iterations: int = 6) -> Tensor:
    """Moore–Penrose pseudo-inverse by Newton–Schulz iterations (as in Nyströmformer), scaled per matrix.

    Rows and columns that are entirely zero (unused landmarks) stay zero in the result.
    """
    a = x.abs()
    scale = a.sum(-1).amax(-1) * a.sum(-2).amax(-1)
    z = x.transpose(-1, -2) / scale[..., None, None]
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention with padding masks and a depthwise residual convolution on values."""

    def __init__(self, dim: int, heads: int, landmarks: int, dropout: float, *, pinv_iterations: int = 6,
                 residual_kernel: int = 33) -> None:
        super().__init__()
        self.heads = heads
        self.landmarks = landmarks
        self.pinv_iterations = pinv_iterations
        self.scale = (dim // heads) ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.residual = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0),
                                  groups=heads, bias=False)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the attended tokens (B, N, dim) and the first token's attention over all tokens (B, N)."""
        b, n, _ = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v = self.to_qkv(x.float()).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            keep = mask[:, None, :, None].float()
            q, k, v = q * keep * self.scale, k * keep, v * keep

            valid = mask.sum(1)
            used = valid.clamp(max=self.landmarks)
            rank = mask.long().cumsum(1) - 1
            segment = torch.where(mask, rank * used[:, None] // valid[:, None], self.landmarks)
            assign = F.one_hot(segment, self.landmarks + 1)[..., :-1].float()
            counts = assign.sum(1).clamp_min(1)[:, None, :, None]
            q_l = torch.einsum("bnl,bhnd->bhld", assign, q) / counts
            k_l = torch.einsum("bnl,bhnd->bhld", assign, k) / counts

            live = torch.arange(self.landmarks, device=x.device)[None, :] < used[:, None]
            low = torch.finfo(torch.float32).min
            kernel_1 = (q @ k_l.transpose(-1, -2)).masked_fill(~live[:, None, None, :], low).softmax(-1)
            kernel_2 = (q_l @ k_l.transpose(-1, -2)).masked_fill(~live[:, None, None, :], low).softmax(-1)
            kernel_2 = kernel_2 * live[:, None, :, None]
            kernel_3 = (q_l @ k.transpose(-1, -2)).masked_fill(~mask[:, None, None, :], low).softmax(-1)
            kernel_3 = kernel_3 * live[:, None, :, None]

            left = kernel_1 @ iterative_pinv(kernel_2, self.pinv_iterations)
            out = left @ (kernel_3 @ v) + self.residual(v)
            first_row = (left[:, :, :1] @ kernel_3).squeeze(2).mean(1)
            out = out.transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out), first_row


class _Layer(nn.Module):
    def __init__(self, dim: int, heads: int, landmarks: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = NystromAttention(dim, heads, landmarks, dropout)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        out, first_row = self.attention(self.norm(x), mask)
        return x + out, first_row


class PPEG(nn.Module):
    """Pyramid position encoding: depthwise 7×7, 5×5 and 3×3 convolutions over the tile grid, added to it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, tokens: Tensor, coords: Tensor, mask: Tensor) -> Tensor:
        b, n, c = tokens.shape
        width = int(coords[..., 0][mask].max()) + 1
        height = int(coords[..., 1][mask].max()) + 1
        cell = torch.where(mask, coords[..., 1] * width + coords[..., 0], 0)[..., None].expand(-1, -1, c)
        canvas = torch.zeros(b, height * width, c, device=tokens.device, dtype=tokens.dtype)
        canvas = canvas.scatter_add(1, cell, tokens * mask[..., None].to(tokens.dtype))
        grid = canvas.transpose(1, 2).reshape(b, c, height, width)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return grid.flatten(2).transpose(1, 2).gather(1, cell)


class TransMIL(MILHead):
    """Projection, class token, Nyström layer, PPEG, Nyström layer, LayerNorm; the class token is the slide.

    Per-tile attention is the class token's row of the last layer's (Nyström-approximated)
    attention, averaged over heads, clipped at 0 and renormalised over the real tiles.
    """

    needs_coords = True

    def __init__(self, in_dim: int, readout: Readout, cfg: HeadConfig, n_classes: int = 0) -> None:
        super().__init__(in_dim, readout, cfg, n_classes)
        self.embed_dim = cfg.hidden
        landmarks = cfg.landmarks or cfg.hidden // 2
        self.project = projection(in_dim, cfg)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.hidden) * 0.02)
        self.layer_1 = _Layer(cfg.hidden, cfg.heads, landmarks, cfg.dropout)
        self.ppeg = PPEG(cfg.hidden)
        self.layer_2 = _Layer(cfg.hidden, cfg.heads, landmarks, cfg.dropout)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.readout = readout(cfg.hidden)

    def forward(self, x: Tensor, mask: Tensor, coords: Tensor | None = None,
                labels: Tensor | None = None) -> HeadOutput:
        if coords is None:
            raise ValueError("TransMIL needs tile grid coordinates (coords); build bags with coords=True")
        h = self.project(x)
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(h.dtype), h], 1)
        m = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
        h, _ = self.layer_1(h, m)
        h = torch.cat([h[:, :1], self.ppeg(h[:, 1:], coords, mask)], 1)
        h, first_row = self.layer_2(h, m)
        z = self.norm(h[:, 0])
        attention = first_row[:, 1:].clamp_min(0) * mask
        attention = attention / attention.sum(1, keepdim=True).clamp_min(1e-12)
        return HeadOutput(self.readout(z), z, attention)
