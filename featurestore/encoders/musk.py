"""MUSK (Xiang et al., Nature 2025): the image path of its BEiT-3 multiway transformer, rebuilt in timm.

The ``musk`` package (github.com/lilab-stanford/MUSK, not on PyPI) and its vendored torchscale were
read, not run. ``musk_large_patch16_384`` is ``BEiT3`` with ``_get_large_config(img_size=384)``: width
1024, 24 layers, 16 heads, FFN 4096, GELU, ``subln`` (a LayerNorm after attention, before
``out_proj``, and one after the FFN activation, before ``fc2``), pre-norm, a final LayerNorm,
LayerNorm eps 1e-5. Every multiway module holds an image (``A``) and a text (``B``) expert; an image
alone runs only the ``A`` experts. Its positions are Fairseq-style: row ``2 + i`` of
``encoder.embed_positions.A.weight`` for token ``i`` (class token first).

That path is timm's ``VisionTransformer`` with ``scale_attn_norm`` and ``scale_mlp_norm``; query, key
and value are fused into ``qkv``. TRIDENT's MUSK embedding (``MuskInferenceEncoder`` defaults:
``with_head=False, out_norm=False, ms_aug=False, return_global=True``) is the class token of the
final LayerNorm, 1024-d. The multi-scale augmentation (``ms_aug=True``, 2048-d) the MUSK README
suggests for linear probes is not reproduced.
"""

from __future__ import annotations

import functools
import math
import re

import torch
import torch.nn.functional as F
from timm.models import VisionTransformer
from torch import nn

from featurestore.encoders._config import TeacherConfig
from featurestore.schemas.errors import ModelError

_LAYER = re.compile(r"beit3\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_BLOCK = {
    "self_attn_layer_norm": "norm1",
    "self_attn.inner_attn_ln": "attn.norm",
    "self_attn.out_proj": "attn.proj",
    "final_layer_norm": "norm2",
    "ffn.fc1": "mlp.fc1",
    "ffn.ffn_layernorm": "mlp.norm",
    "ffn.fc2": "mlp.fc2",
}
_TOP = {
    "beit3.vision_embed.proj.weight": "patch_embed.proj.weight",
    "beit3.vision_embed.proj.bias": "patch_embed.proj.bias",
    "beit3.vision_embed.cls_token": "cls_token",
    "beit3.encoder.layer_norm.A.weight": "norm.weight",
    "beit3.encoder.layer_norm.A.bias": "norm.bias",
}
_POSITIONS = "beit3.encoder.embed_positions.A.weight"
_FAIRSEQ_OFFSET = 2
# Text tower, text experts, masked-image token, contrastive heads: not on the image embedding's path.
_UNUSED = re.compile(r"beit3\.text_embed\..*|beit3\.vision_embed\.mask_token|.*\.B\..*"
                     r"|vision_head\..*|language_head\..*|logit_scale")


def musk(config: TeacherConfig) -> VisionTransformer:
    """ViT-L/16 at 384 px with sub-LayerNorms in attention and MLP, LayerNorm eps 1e-5, no layer scale."""
    return VisionTransformer(img_size=384, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4,
                             qkv_bias=True, scale_attn_norm=True, scale_mlp_norm=True,
                             norm_layer=functools.partial(nn.LayerNorm, eps=1e-5), num_classes=0)


def from_beit3(state: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Keep the image experts of a MUSK checkpoint, renamed onto ``model``; unknown keys pass through to fail."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        # The image expert's tensors: ``...q_proj.A.weight``, ``...ffn.A.fc1.weight``.
        layer = _LAYER.fullmatch(key.replace(".A.", ".")) if ".A." in key else None
        if _UNUSED.fullmatch(key):
            continue
        if key in _TOP:
            out[_TOP[key]] = value
        elif key == _POSITIONS:
            out["pos_embed"] = _positions(value, model)
        elif layer and layer[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((layer[1], layer[3]), {})[layer[2][-6]] = value
        elif layer and layer[2] in _BLOCK:
            out[f"blocks.{layer[1]}.{_BLOCK[layer[2]]}.{layer[3]}"] = value
        else:
            out[key] = value
    for (index, kind), parts in qkv.items():
        if parts.keys() != {"q", "k", "v"}:
            raise ModelError(f"musk: layer {index} has only {sorted(parts)} {kind}s of q/k/v; pass --weights PATH "
                             "to a complete MUSK checkpoint")
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _positions(table: torch.Tensor, model: VisionTransformer) -> torch.Tensor:
    """Fairseq rows 2.. as timm's ``pos_embed``; another grid is resampled as MUSK's loader does.

    ``musk.utils.load_model_and_may_interpolate`` keeps the first 3 rows (2 Fairseq rows + class) and
    resizes the rest bicubically (``align_corners=False``, float32) when the checkpoint's grid differs.
    """
    extra = _FAIRSEQ_OFFSET + 1
    n = math.isqrt(table.shape[0] - extra)
    grid = model.patch_embed.grid_size
    if n * n != table.shape[0] - extra:
        raise ModelError(f"musk: position table of {table.shape[0]} rows is not 3 + a square grid; pass --weights "
                         "PATH to a MUSK checkpoint")
    if (n, n) != tuple(grid):
        patches = table[extra:].reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
        patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False).to(table.dtype)
        table = torch.cat([table[:extra], patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])
    return table[_FAIRSEQ_OFFSET:].unsqueeze(0)
