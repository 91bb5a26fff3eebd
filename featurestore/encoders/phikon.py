"""Phikon-v2 (Owkin): a transformers ``Dinov2Model`` ViT-L/16, rebuilt in timm so transformers is not needed.

The hub's ``config.json`` (huggingface.co/owkin/phikon-v2): hidden 1024, 24 layers, 16 heads,
patch 16, image 224, MLP ratio 4 with GELU, layer scale, ``layer_norm_eps`` 1e-6, qkv bias.
timm's ViT-L/16 with layer scale is the same network; ``from_hf_dinov2`` renames the checkpoint's
keys (HF's separate query/key/value are fused into timm's ``qkv``). ``last_hidden_state[:, 0]``
is timm's ``forward_features(x)[:, 0]``.
"""

from __future__ import annotations

import re

import timm
import torch
from timm.models import VisionTransformer

from featurestore.encoders._config import TeacherConfig
from featurestore.schemas.errors import ModelError

_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_BLOCK = {
    "norm1": "norm1",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layer_scale2.lambda1": "ls2.gamma",
}
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_QKV = re.compile(r"attention\.attention\.(query|key|value)\.(weight|bias)")
_UNUSED = "embeddings.mask_token"


def phikon_v2(config: TeacherConfig) -> VisionTransformer:
    """ViT-L/16 at 224 px with layer scale (its init value is irrelevant: the checkpoint sets it)."""
    return timm.create_model("vit_large_patch16_224", img_size=224, init_values=1.0, num_classes=0)


def from_hf_dinov2(state: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Rename a transformers Dinov2 state dict to timm's ViT keys; unknown keys pass through to fail the load.

    ``embeddings.mask_token`` is dropped: it only replaces masked patches during iBOT training.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == _UNUSED:
            continue
        layer = _LAYER.fullmatch(key)
        if key in _TOP:
            out[_TOP[key]] = value
        elif layer is None:
            out[key] = value
        elif part := _QKV.fullmatch(layer[2]):
            qkv.setdefault((layer[1], part[2]), {})[part[1]] = value
        else:
            out[_block_key(layer[1], layer[2])] = value
    for (index, kind), parts in qkv.items():
        if parts.keys() != {"query", "key", "value"}:
            raise ModelError(f"phikon-v2: layer {index} has only {sorted(parts)} {kind}s of query/key/value; "
                             "pass --weights PATH to a complete Dinov2 checkpoint")
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def _block_key(index: str, rest: str) -> str:
    for hf, timm_name in _BLOCK.items():
        if rest == hf or rest.startswith(hf + "."):
            return f"blocks.{index}.{timm_name}{rest[len(hf):]}"
    return f"encoder.layer.{index}.{rest}"
