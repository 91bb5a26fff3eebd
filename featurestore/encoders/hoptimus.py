"""H-optimus-0, H-optimus-1 and H0-mini (Bioptimus): timm DINOv2 ViTs with 4 register tokens.

H-optimus-0 and H-optimus-1 share one architecture: their model cards (huggingface.co/bioptimus/
H-optimus-0, H-optimus-1) and TRIDENT's ``HOptimus0InferenceEncoder``/``HOptimus1InferenceEncoder``
pass the same ``init_values=1e-5`` to ``vit_giant_patch14_reg4_dinov2`` at 224 px
(github.com/bioptimus/releases lists the same parameters). H0-mini follows its card
(``mlp_layer=SwiGLUPacked, act_layer=SiLU`` on ``vit_base_patch14_reg4_dinov2``); its hub
``config.json`` could not be read here, so ``mlp_ratio=5.33334`` (DINOv2's SwiGLU width for ViT-B,
2048 hidden) is inferred, not confirmed: a checkpoint with another MLP width fails the strict load
and says so.
"""

from __future__ import annotations

import timm
import torch
from timm.layers import SwiGLUPacked
from timm.models import VisionTransformer

from featurestore.encoders._config import TeacherConfig


def h_optimus(config: TeacherConfig) -> VisionTransformer:
    """ViT-g/14: 40 blocks, width 1536, packed SwiGLU, position embedding for patches only."""
    return timm.create_model("vit_giant_patch14_reg4_dinov2", img_size=224, init_values=1e-5,
                             dynamic_img_size=False, num_classes=0)


def h0_mini(config: TeacherConfig) -> VisionTransformer:
    """ViT-B/14: 12 blocks, width 768, packed SwiGLU (2048 hidden), 1 class + 4 register tokens."""
    return timm.create_model("vit_base_patch14_reg4_dinov2", img_size=224, mlp_ratio=5.33334,
                             mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, num_classes=0)
