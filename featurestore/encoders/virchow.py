"""Virchow and Virchow2 (Paige): timm ViT-H/14 with packed SwiGLU; Virchow2 adds 4 register tokens.

Arguments from the model cards and hub configs (huggingface.co/paige-ai/Virchow,
huggingface.co/paige-ai/Virchow2; TRIDENT ``VirchowInferenceEncoder`` and
``Virchow2InferenceEncoder`` load ``pytorch_model.bin`` strictly into the same). ``global_pool=""``
makes the network return all tokens; the teacher pools class token ++ patch-token mean, skipping
the registers.
"""

from __future__ import annotations

import timm
import torch
from timm.layers import SwiGLUPacked
from timm.models import VisionTransformer

from featurestore.encoders._config import TeacherConfig


def virchow(config: TeacherConfig) -> VisionTransformer:
    """ViT-H/14: 32 blocks, width 1280, MLP 6832 packed, 1 class token, no registers."""
    return timm.create_model("vit_huge_patch14_224", img_size=224, init_values=1e-5, num_classes=0,
                             mlp_ratio=5.3375, global_pool="", dynamic_img_size=True, mlp_layer=SwiGLUPacked,
                             act_layer=torch.nn.SiLU)


def virchow2(config: TeacherConfig) -> VisionTransformer:
    """ViT-H/14: 32 blocks, width 1280, MLP 6832 packed, 1 class + 4 register tokens."""
    return timm.create_model("vit_huge_patch14_224", img_size=224, init_values=1e-5, num_classes=0,
                             mlp_ratio=5.3375, global_pool="", dynamic_img_size=True, mlp_layer=SwiGLUPacked,
                             act_layer=torch.nn.SiLU, reg_tokens=4)
