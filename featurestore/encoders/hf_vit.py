"""transformers ``ViTModel`` and ``Dinov2Model`` checkpoints renamed onto timm's ``VisionTransformer``.

transformers is not a dependency; its modules were read, not run (github.com/huggingface/transformers
``models/vit/modeling_vit.py`` and ``models/dinov2/modeling_dinov2.py``). Both are pre-norm ViTs
whose tensors map one to one onto timm's, except that separate query/key/value become timm's
fused ``qkv``. Dinov2's SwiGLU MLP (``weights_in``/``weights_out``, ``silu(x1) * x2`` of the two
halves) is timm's packed SwiGLU ``fc1``/``fc2``. Register tokens (Hibou's ``Dinov2ModelWithRegisters``)
are inserted after the position embedding is added to class and patch tokens, which is timm's
``no_embed_class`` layout once the class token's position is folded into the class token.

A position embedding trained for another grid is resampled once, as transformers'
``Dinov2Embeddings.interpolate_pos_encoding`` does on every call: bicubic to the new patch grid,
``align_corners=False``, no antialiasing, in float32, the class position kept.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from timm.models import VisionTransformer

from featurestore.schemas.errors import ModelError

_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_BLOCK = {
    # Dinov2Layer
    "norm1": "norm1",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.fc1",
    "mlp.weights_out": "mlp.fc2",
    "layer_scale2.lambda1": "ls2.gamma",
    # ViTLayer
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_POSITIONS = "embeddings.position_embeddings"
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_QKV = re.compile(r"attention\.attention\.(query|key|value)\.(weight|bias)")
# The mask token only replaces masked patches in iBOT/DINOv2 training; ViTModel's pooler is not
# part of the embedding TRIDENT and the model cards take (``last_hidden_state``).
_UNUSED = ("embeddings.mask_token", "pooler.dense.weight", "pooler.dense.bias")


def from_transformers(state: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Rename a ``ViTModel``/``Dinov2Model`` state dict to ``model``'s keys; unknown keys pass through to fail."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        layer = _LAYER.fullmatch(key)
        if key in _UNUSED or key == _POSITIONS:
            continue
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
            raise ModelError(f"transformers checkpoint: layer {index} has only {sorted(parts)} {kind}s of "
                             "query/key/value; pass --weights PATH to a complete checkpoint")
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    if _POSITIONS in state:
        out |= _positions(state[_POSITIONS], out.get("cls_token"), model)
    return out


def _block_key(index: str, rest: str) -> str:
    for hf, timm_name in _BLOCK.items():
        if rest == hf or rest.startswith(hf + "."):
            return f"blocks.{index}.{timm_name}{rest[len(hf):]}"
    return f"encoder.layer.{index}.{rest}"


def _positions(pos: torch.Tensor, cls: torch.Tensor | None, model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Class + patch position embedding → timm's ``pos_embed`` (and class token when registers follow it)."""
    grid = tuple(model.patch_embed.grid_size)
    if pos.shape[1] - 1 != grid[0] * grid[1]:
        pos = resize_patch_positions(pos, grid)
    if not model.no_embed_class or cls is None:
        return {"pos_embed": pos}
    return {"pos_embed": pos[:, 1:], "cls_token": cls + pos[:, :1]}


def resize_patch_positions(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """transformers' ``interpolate_pos_encoding``: bicubic, no antialias, float32; the class position kept."""
    n = math.isqrt(pos.shape[1] - 1)
    if n * n != pos.shape[1] - 1:
        raise ModelError(f"transformers checkpoint: position embedding of {pos.shape[1]} tokens is not 1 + a "
                         "square grid; pass --weights PATH to a checkpoint of this model")
    patches = pos[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False).to(pos.dtype)
    return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)
