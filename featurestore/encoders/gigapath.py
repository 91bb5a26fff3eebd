"""Prov-GigaPath tile encoder (Microsoft / Providence): timm ``vit_giant_patch14_dinov2`` at 16 px patches.

The arguments are the ``model_args`` of the hub's ``config.json`` (huggingface.co/prov-gigapath/
prov-gigapath), which override the architecture name's 14 px patch with 16; the packed SwiGLU
MLP comes from the architecture's own defaults. ``pytorch_model.bin`` is a timm state dict.
"""

from __future__ import annotations

import timm
from timm.models import VisionTransformer

from featurestore.encoders._config import TeacherConfig


def gigapath(config: TeacherConfig) -> VisionTransformer:
    """ViT-g/16: 40 blocks, width 1536, 24 heads, layer scale, 1 class token."""
    return timm.create_model("vit_giant_patch14_dinov2", img_size=224, in_chans=3, patch_size=16,
                             embed_dim=1536, depth=40, num_heads=24, init_values=1e-5, mlp_ratio=5.33334,
                             num_classes=0)
