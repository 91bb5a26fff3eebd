"""TITAN's slide tower (huggingface.co/MahmoodLab/TITAN, ``vision_transformer.py``, ``configuration_titan.py``).

CONCH v1.5 features are placed on the slide's tile grid (``preprocess_features``), empty cells are
dropped, and a 6-block ViT (768-d, 12 heads) with 2-D ALiBi — an attention bias of minus a per-head
slope times the Euclidean grid distance between tiles — encodes the tiles plus a class token. The
slide embedding is the contrastive attentional pooler's single query over the final tokens
(``encode_slide_from_patch_features`` calls the tower with ``no_proj=True``). ``attn_pool`` (128
queries, for report generation) and ``proj`` are loaded for the strict check but not needed here.
Module names follow the vendor's, so the checkpoint's ``vision_encoder.*`` keys load strictly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featurestore.encoders.slide._config import SlideEncoderConfig
from featurestore.schemas.errors import ModelError

WIDTH, DEPTH, HEADS, MLP_RATIO, POOL_HEADS, POOL_QUERIES = 768, 6, 12, 4.0, 8, 128
TOWER = "vision_encoder."


def grid(features: torch.Tensor, coords: torch.Tensor, patch_size_lv0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``preprocess_features``: a (H, W, C) grid indexed by (x, y) // patch size, and its non-empty cells.

    TITAN puts the x coordinate on the first axis, and a cell is background where every feature is 0.
    """
    cells = torch.div(coords - coords.min(0).values, patch_size_lv0, rounding_mode="floor")
    cells = cells - cells.min(0).values
    h, w = (int(v) + 1 for v in cells.max(0).values)
    out = torch.zeros(h * w, features.shape[-1], device=features.device, dtype=features.dtype)
    out.index_add_(0, cells[:, 0] * w + cells[:, 1], features)
    out = out.view(h, w, -1)
    return out, torch.any(out != 0, dim=-1)


def alibi_slopes(n: int) -> list[float]:
    """ALiBi's head slopes (Press et al.), with its rule for head counts that are not powers of two."""
    if math.log2(n).is_integer():
        p = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [p * p**i for i in range(n)]
    base = 2 ** math.floor(math.log2(n))
    return alibi_slopes(base) + alibi_slopes(2 * base)[0::2][: n - base]


def alibi_bias(h: int, w: int, keep: torch.Tensor, heads: int) -> torch.Tensor:
    """``get_alibi(w, h, bg_mask)``: (1, heads, n+1, n+1), zero on the class token's row and column."""
    x, y = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    mask = keep.cpu().numpy()
    points = np.stack([x[mask], y[mask]], axis=1).astype(np.float64)
    dists = torch.tensor(np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1)), dtype=torch.float32)
    slopes = torch.tensor(alibi_slopes(heads), dtype=torch.float32).view(heads, 1, 1)
    n = len(points)
    bias = torch.zeros(1, heads, n + 1, n + 1)
    bias[:, :, 1:, 1:] = -dists[None] * slopes
    return bias


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """timm's ``Mlp`` (fc1, GELU, fc2) under its parameter names."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * MLP_RATIO))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), bias)
        return x + self.mlp(self.norm2(x))


class Blocks(nn.Module):
    """TITAN's ``CustomSequential``: blocks that also take the attention bias, under ``modules_list``."""

    def __init__(self, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.modules_list = nn.ModuleList(Block(dim, heads) for _ in range(depth))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        for block in self.modules_list:
            x = block(x, bias)
        return x


class AttentionalPooler(nn.Module):
    """open_clip's ``AttentionalPooler``: learned queries attend over the tokens (keys and values layer-normed)."""

    def __init__(self, dim: int, heads: int, queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(queries, dim))
        self.attn = nn.MultiheadAttention(dim, heads, kdim=dim, vdim=dim)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x).permute(1, 0, 2)
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, x.shape[1], -1)
        return self.attn(q, x, x, need_weights=False)[0].permute(1, 0, 2)


class TitanTower(nn.Module):
    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.patch_embed = nn.Sequential(nn.Linear(in_dim, WIDTH), nn.GELU())
        self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.blocks = Blocks(WIDTH, DEPTH, HEADS)
        self.norm = nn.LayerNorm(WIDTH, eps=1e-6)
        self.attn_pool = AttentionalPooler(WIDTH, POOL_HEADS, POOL_QUERIES)
        self.attn_pool_contrastive = AttentionalPooler(WIDTH, POOL_HEADS, 1)
        self.proj = nn.Parameter(torch.zeros(WIDTH, WIDTH))

    def encode(self, features: torch.Tensor, coords: torch.Tensor, patch_size_lv0: int) -> torch.Tensor:
        cells, keep = grid(features.float(), coords, patch_size_lv0)
        bias = alibi_bias(*keep.shape, keep, HEADS).to(features.device)
        x = self.patch_embed(cells.view(-1, cells.shape[-1])[keep.view(-1)][None])
        x = torch.cat([self.cls_token.to(x.dtype), x], dim=1)
        x = self.norm(self.blocks(x, bias))
        return self.attn_pool_contrastive(x)[:, 0]


def titan(config: SlideEncoderConfig, in_dim: int) -> TitanTower:
    return TitanTower(in_dim)


def vision_tower(state: dict[str, torch.Tensor], model: TitanTower) -> dict[str, torch.Tensor]:
    """The ``vision_encoder.*`` tensors of the full TITAN checkpoint (the text tower is not loaded)."""
    tower = {k.removeprefix(TOWER): v for k, v in state.items() if k.startswith(TOWER)}
    if not tower:
        raise ModelError(f"titan: the checkpoint has no {TOWER}* tensors; pass --weights PATH to TITAN's "
                         "model.safetensors")
    return tower
