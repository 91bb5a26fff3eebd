"""Lunit DINO ViT-S/8 (Kang et al., CVPR 2023): timm's ``vit_small_patch8_224``.

github.com/lunit-io/benchmark-ssl-pathology README builds ``VisionTransformer(img_size=224,
patch_size=8, embed_dim=384, num_heads=6, num_classes=0)`` and loads the release weights strictly;
huggingface.co/1aurent/vit_small_patch8_224.lunit_dino mirrors them in timm's layout (TRIDENT's
``lunit-vits8``). The embedding is the final LayerNorm's class token (384-d).
"""

from __future__ import annotations

import timm
from timm.models import VisionTransformer

from featurestore.encoders._config import TeacherConfig


def lunit_vits8(config: TeacherConfig) -> VisionTransformer:
    """ViT-S/8 at 224 px: 12 blocks, width 384, 6 heads, 785 positions."""
    return timm.create_model("vit_small_patch8_224", img_size=224, dynamic_img_size=True, num_classes=0)
