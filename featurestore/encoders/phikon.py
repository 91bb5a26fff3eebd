"""Phikon and Phikon-v2 (Owkin): transformers ViTs rebuilt in timm, so transformers is not needed.

Phikon: ``ViTModel`` ViT-B/16 trained with iBOT; the hub's ``config.json`` (huggingface.co/owkin/phikon,
main): hidden 768, 12 layers, 12 heads, patch 16, image 224, MLP 3072 with GELU, qkv bias,
``layer_norm_eps`` 1e-6 (timm's, since the hub's "match timm" revision), no layer scale.

Phikon-v2: ``Dinov2Model`` ViT-L/16; the hub's ``config.json`` (huggingface.co/owkin/phikon-v2):
hidden 1024, 24 layers, 16 heads, patch 16, image 224, MLP ratio 4 with GELU, layer scale,
``layer_norm_eps`` 1e-6, qkv bias.

Both embed as ``last_hidden_state[:, 0]``, which is timm's ``forward_features(x)[:, 0]``;
``hf_vit.from_transformers`` renames the checkpoints' keys.
"""

from __future__ import annotations

import timm
from timm.models import VisionTransformer

from featurestore.encoders._config import TeacherConfig
from featurestore.encoders.hf_vit import from_transformers as from_hf_dinov2

__all__ = ["from_hf_dinov2", "phikon", "phikon_v2"]


def phikon(config: TeacherConfig) -> VisionTransformer:
    """ViT-B/16 at 224 px, 1 class token, no layer scale."""
    return timm.create_model("vit_base_patch16_224", img_size=224, num_classes=0)


def phikon_v2(config: TeacherConfig) -> VisionTransformer:
    """ViT-L/16 at 224 px with layer scale (its init value is irrelevant: the checkpoint sets it)."""
    return timm.create_model("vit_large_patch16_224", img_size=224, init_values=1.0, num_classes=0)
