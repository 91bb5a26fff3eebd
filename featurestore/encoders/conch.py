"""CONCH v1 and v1.5 (Mahmood Lab): the image towers, rebuilt from timm plus their attentional poolers.

open_clip and the CONCH package are not dependencies, so their code was read, not run:

* v1 — github.com/mahmoodlab/CONCH ``open_clip_custom/coca_model.py``, ``vision_tower.py``,
  ``transformer.py`` and ``model_configs/conch_ViT-B-16.json``: the trunk is timm's
  ``VisionTransformer`` (ViT-B/16, 448 px, ``dynamic_img_size``) called through ``forward_features``;
  ``encode_image(proj_contrast=False, normalize=False)`` is
  ``ln_contrast(attn_pool_contrast(tokens)[:, 0])`` with open_clip's ``AttentionalPooler``
  (``nn.MultiheadAttention``, d_model 512, context 768, 8 heads, 1 query).
* v1.5 — TRIDENT ``patch_encoder_models/model_zoo/conchv1_5/conchv1_5.py`` and TITAN's
  ``ConchConfig``: an iBOT ViT-L/16 (qkv bias, layer scale) built at 224 px and fed 448 px, its
  position embedding re-interpolated DINO-style on every call; a bias-free perceiver pooler
  (``to_q``/``to_kv``/``to_out``, d_model 768, context 1024, 8 heads, 1 query); ``ln_contrast``.

Checkpoint key layouts are taken from those modules' parameter names: the v1 CoCa checkpoint
(``pytorch_model.bin``) nests the tower under ``visual.`` next to the text towers, and v1.5's
``pytorch_model_vision.bin`` holds ``trunk.*``, ``attn_pool_contrast.*`` and ``ln_contrast.*``,
which TRIDENT loads strictly. They have not been checked against the real files, which could
not be downloaded here; a mismatch fails the strict load with the offending keys named.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models import VisionTransformer
from torch import nn

from featurestore.encoders._config import TeacherConfig
from featurestore.schemas.errors import ModelError

_V1_UNUSED = ("visual.attn_pool_caption.", "visual.ln_caption.", "visual.proj_contrast")


class CoCaPooler(nn.Module):
    """open_clip's ``AttentionalPooler`` (CONCH v1): learned queries cross-attend to the trunk's tokens."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x).permute(1, 0, 2)
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, x.shape[1], -1)
        return self.attn(q, x, x, need_weights=False)[0].permute(1, 0, 2)


class PerceiverPooler(nn.Module):
    """TITAN's ``AttentionalPooler`` (CONCH v1.5): bias-free query, key/value and output projections."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.heads = n_head
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.to_q(self.ln_q(self.query)).expand(x.shape[0], -1, -1)
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class ConchVisual(nn.Module):
    """Image tower up to the contrastive embedding: trunk tokens → attentional pooler → LayerNorm."""

    def __init__(self, trunk: VisionTransformer, pooler: nn.Module, width: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = pooler
        self.ln_contrast = nn.LayerNorm(width)
        self.num_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])


def conch_v1(config: TeacherConfig) -> ConchVisual:
    """ViT-B/16 at 448 px (785 position embeddings) + CoCa contrastive pooler → 512-d."""
    trunk = VisionTransformer(img_size=448, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4,
                              num_classes=0, dynamic_img_size=True)
    return ConchVisual(trunk, CoCaPooler(512, 768), 512)


def conch_v1_5(config: TeacherConfig) -> ConchVisual:
    """ViT-L/16 built at 448 px (``from_titan`` fits its position embedding) + perceiver pooler → 768-d."""
    trunk = VisionTransformer(img_size=448, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                              mlp_ratio=4, qkv_bias=True, init_values=1.0, num_classes=0)
    return ConchVisual(trunk, PerceiverPooler(768, 1024), 768)


def from_coca(state: dict[str, torch.Tensor], model: ConchVisual) -> dict[str, torch.Tensor]:
    """Keep a CoCa checkpoint's contrastive image path; a bare image-tower state dict passes through."""
    if not any(k.startswith("visual.") for k in state):
        return state
    return {k.removeprefix("visual."): v for k, v in state.items()
            if k.startswith("visual.") and not k.startswith(_V1_UNUSED)}


def from_titan(state: dict[str, torch.Tensor], model: ConchVisual) -> dict[str, torch.Tensor]:
    """Interpolate the 224 px position embedding to 448 px once, as the official forward does per call."""
    pos = state.get("trunk.pos_embed")
    if pos is None or pos.shape == model.trunk.pos_embed.shape:
        return state
    return {**state, "trunk.pos_embed": dino_resize_pos_embed(pos, model.trunk.patch_embed.grid_size)}


def dino_resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """DINO/iBOT ``interpolate_pos_encoding``: bicubic by scale factor ``(g + 0.1) / n``, class token kept."""
    n = math.isqrt(pos.shape[1] - 1)
    if n * n != pos.shape[1] - 1:
        raise ModelError(f"conch-v1.5: position embedding of {pos.shape[1]} tokens is not 1 + a square grid; "
                         "pass --weights PATH to a CONCH v1.5 checkpoint")
    patches = pos[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, scale_factor=((grid[0] + 0.1) / n, (grid[1] + 0.1) / n), mode="bicubic")
    patches = patches.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1]).to(pos.dtype)
    return torch.cat([pos[:, :1], patches], dim=1)
