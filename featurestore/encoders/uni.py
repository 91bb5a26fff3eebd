"""UNI and UNI2-h (Mahmood Lab): timm ViTs with the exact ``timm_kwargs`` of their model cards.

Checkpoints (``pytorch_model.bin``) are timm state dicts and load strictly as they are
(huggingface.co/MahmoodLab/UNI, huggingface.co/MahmoodLab/UNI2-h).
"""

from __future__ import annotations

import timm
import torch
from timm.layers import SwiGLUPacked
from timm.models import VisionTransformer

from featurestore.encoders._config import TeacherConfig


def uni(config: TeacherConfig) -> VisionTransformer:
    """ViT-L/16 with layer scale; 1 class token, no registers."""
    return timm.create_model("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5,
                             num_classes=0, dynamic_img_size=True)


def uni2_h(config: TeacherConfig) -> VisionTransformer:
    """ViT-H/14 (24 blocks, width 1536) with packed SwiGLU MLPs and 8 register tokens."""
    return timm.create_model("vit_giant_patch14_224", img_size=224, patch_size=14, depth=24, num_heads=24,
                             init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0,
                             no_embed_class=True, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU,
                             reg_tokens=8, dynamic_img_size=True)
