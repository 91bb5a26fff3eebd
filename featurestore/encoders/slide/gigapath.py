"""Prov-GigaPath's slide encoder: LongNet over GigaPath tiles (github.com/prov-gigapath/prov-gigapath).

``gigapath/slide_encoder.py`` (``gigapath_slide_enc12l768d``) with its torchscale copy
(``LongNet_12_layers_768_dim``, ``EncoderConfig`` defaults: pre-LN with sub-LN, LayerNorm eps 1e-5,
GELU, no embedding scale). Each 1536-d tile is projected to 768-d and given the 2-D sin-cos position
of its cell ``(x // patch_size_lv0, y // patch_size_lv0)`` on a 1000 × 1000 grid (computed for the
tiles present rather than as the vendor's 10⁶-row table, which has the same values); a class token is
prepended, and 12 layers of dilated attention follow. The slide embedding is TRIDENT's: the mean of the
tile tokens after layer 11 of 12 (``all_layer_embed=True)[11]`` with ``global_pool=True``), layer-normed.

Dilated attention is computed as ``custom_dilated_attention.py`` does with flash attention, in plain
torch: for every (segment length, ratio) pair — segments ``[1024, 5792, 32768, 185363, 1048576]`` (its
``get_optimal_segment_length`` for 256 px tiles and 262144 px slides), ratios ``[1, 2, 4, 8, 16]`` — the
sequence is cut into segments (a segment longer than the sequence is the whole sequence), zero-padded
to whole segments and to a multiple of the ratio, and head group ``g`` attends among the tokens at
positions ``≡ g (mod ratio)`` of its segment. The zero padding counts as tokens, as in the vendor's
varlen call whose padding mask marks them valid. The branches are merged by their softmax
normalisers (log-sum-exp weights). None of this is dense attention, even for short bags: the ratio
2-16 branches re-weight every other, fourth... key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from featurestore.encoders.slide._config import SlideEncoderConfig
from featurestore.schemas.errors import ModelError

WIDTH, DEPTH, HEADS, FFN, GRID, LAYER = 768, 12, 16, 3072, 1000, 11
SEGMENTS = (1024, 5792, 32768, 185363, 1048576)
RATIOS = (1, 2, 4, 8, 16)
KEEP = ("patch_embed.", "cls_token", "encoder.", "norm.")
EPS = 1e-5


def sincos_2d(cells: torch.Tensor, dim: int) -> torch.Tensor:
    """MAE's ``get_2d_sincos_pos_embed`` rows for flat grid indices ``cells`` (row-major, ``GRID`` wide).

    The first half encodes the column (``cells % GRID``), the second the row, each as sin then cos of
    ``position / 10000^(2i/(dim/2))``, in float64 as numpy computes it.
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one_d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.double()[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one_d(cells % GRID), one_d(cells // GRID)], dim=1).float()


def _pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    extra = -x.shape[dim] % multiple
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _sparse(x: torch.Tensor, ratio: int) -> torch.Tensor:
    """``dense_to_sparse``: (B, L, H, D) → (B, ceil(L/r), H, D), head group g keeping positions ≡ g mod r."""
    b, _, h, d = x.shape
    x = _pad_to(_pad_to(x, 1, ratio), 2, ratio)
    group = x.shape[2] // ratio
    x = x.view(b, -1, ratio, ratio, group, d)  # b, l, r1 (position), r2 (head group), h, d
    x = torch.diagonal(x, dim1=2, dim2=3)  # b, l, h, d, r
    return x.permute(0, 1, 4, 2, 3).reshape(b, x.shape[1], ratio * group, d)[:, :, :h]


def _dense(out: torch.Tensor, lse: torch.Tensor, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``sparse_to_dense``: back to (B, H, L·r, D) and (B, H, L·r), zero / -1e8 where a head group did not look."""
    b, n, h, d = out.shape
    heads = h + (-h % ratio)
    group = heads // ratio
    dense = out.new_zeros(b, heads, n * ratio, d)
    weights = lse.new_zeros(b, heads, n * ratio)
    for g in range(ratio):
        lo, hi = g * group, min((g + 1) * group, h)
        if lo < hi:
            dense[:, lo:hi, g::ratio] = out[:, :, lo:hi].transpose(1, 2)
            weights[:, lo:hi, g::ratio] = lse[:, lo:hi]
    weights = weights.masked_fill(weights == 0, -1e8)
    return dense[:, :h], weights[:, :h]


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """LongNet's multi-branch dilated attention of (B, L, H, D) tensors, non-causal → (B, L, H·D)."""
    b, n, h, d = q.shape
    outs, lses = [], []
    for segment, ratio in zip(SEGMENTS, RATIOS, strict=True):
        length = min(segment, n)

        def gather(x: torch.Tensor, length: int = length, ratio: int = ratio) -> torch.Tensor:
            x = _pad_to(x, 1, length).reshape(-1, length, h, d)
            return _sparse(x, ratio).transpose(1, 2)  # (B·segments, H, l, D)

        qi, ki, vi = gather(q), gather(k), gather(v)
        scores = qi @ ki.transpose(-2, -1) / math.sqrt(d)
        lse = torch.logsumexp(scores, dim=-1)
        out = (scores.softmax(dim=-1) @ vi).transpose(1, 2)  # (B·segments, l, H, D)
        out, lse = _dense(out, lse, ratio)
        out = out.reshape(b, -1, h, out.shape[2], d).permute(0, 2, 1, 3, 4).reshape(b, h, -1, d)[:, :, :n]
        lse = lse.reshape(b, -1, h, lse.shape[2]).permute(0, 2, 1, 3).reshape(b, h, -1)[:, :, :n]
        outs.append(out)
        lses.append(lse)
    stacked = torch.stack(lses)
    weights = torch.exp(stacked - stacked.max(0).values)
    weights = weights / weights.sum(0)
    merged = sum(o * w[..., None] for o, w in zip(outs, weights, strict=True))
    return merged.transpose(1, 2).reshape(b, n, h * d)


class DilatedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.k_proj = nn.Linear(WIDTH, WIDTH)
        self.v_proj = nn.Linear(WIDTH, WIDTH)
        self.q_proj = nn.Linear(WIDTH, WIDTH)
        self.out_proj = nn.Linear(WIDTH, WIDTH)
        self.inner_attn_ln = nn.LayerNorm(WIDTH, eps=EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, HEADS, WIDTH // HEADS) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(self.inner_attn_ln(dilated_attention(q, k, v)))


class FeedForward(nn.Module):
    """torchscale's ``FeedForwardNetwork`` with sub-LN: fc1, GELU, LayerNorm, fc2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(WIDTH, FFN)
        self.fc2 = nn.Linear(FFN, WIDTH)
        self.ffn_layernorm = nn.LayerNorm(FFN, eps=EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x).float()).type_as(x)))


class EncoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = DilatedAttention()
        self.self_attn_layer_norm = nn.LayerNorm(WIDTH, eps=EPS)
        self.ffn = FeedForward()
        self.final_layer_norm = nn.LayerNorm(WIDTH, eps=EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.ffn(self.final_layer_norm(x))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer() for _ in range(DEPTH))
        self.layer_norm = nn.LayerNorm(WIDTH, eps=EPS)


class PatchEmbed(nn.Module):
    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, WIDTH)


class LongNetViT(nn.Module):
    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(in_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.encoder = Encoder()
        self.norm = nn.LayerNorm(WIDTH, eps=1e-6)

    def encode(self, features: torch.Tensor, coords: torch.Tensor, patch_size_lv0: int) -> torch.Tensor:
        cells = torch.div(coords, patch_size_lv0, rounding_mode="floor")
        flat = cells[:, 0] * GRID + cells[:, 1]
        if (cells < 0).any() or int(flat.max()) >= GRID * GRID:
            raise ModelError(f"gigapath: a tile lies outside the {GRID} × {GRID} grid of {patch_size_lv0} px cells "
                             "its position table covers; the slide is larger than Prov-GigaPath was built for")
        x = self.patch_embed.proj(features) + sincos_2d(flat, WIDTH).to(features.device)
        x = torch.cat([self.cls_token.to(x.dtype), x[None]], dim=1)  # the class token's position row is zero
        for layer in self.encoder.layers[:LAYER]:
            x = layer(x)
        return self.norm(x[:, 1:].mean(dim=1))


def gigapath(config: SlideEncoderConfig, in_dim: int) -> LongNetViT:
    return LongNetViT(in_dim)


def encoder_keys(state: dict[str, torch.Tensor], model: LongNetViT) -> dict[str, torch.Tensor]:
    """The slide encoder's own tensors: the vendor loads non-strictly, so pretraining-only tensors are dropped."""
    return {k: v for k, v in state.items() if k.startswith(KEEP)}
