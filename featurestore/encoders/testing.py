"""Tiny real timm networks registered like production teachers, so tests exercise the whole build path.

Their weights are generated from the config's seed; the sha256 of the generated state dict is
their identity, exactly as a checkpoint file's is for real teachers.
"""

from __future__ import annotations

import timm
from timm.models import ResNet, VisionTransformer

from featurestore.encoders._config import TeacherConfig


def tiny_vit(config: TeacherConfig) -> VisionTransformer:
    """ViT with 8 px patches on 32 px tiles, width 32, 2 blocks, 2 register tokens and layer scale."""
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                             init_values=0.5, reg_tokens=2, num_classes=0)


def tiny_cnn(config: TeacherConfig) -> ResNet:
    """timm's ``test_resnet``: a real ResNet of a few hundred thousand parameters, 96 output channels."""
    return timm.create_model("test_resnet", num_classes=0)
