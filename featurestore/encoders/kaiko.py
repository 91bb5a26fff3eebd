"""kaiko.ai: the "Towards Large-Scale Training of Pathology FMs" ViTs and Midnight-12k.

ViT-S/16, ViT-S/8, ViT-B/16, ViT-B/8, ViT-L/14: github.com/kaiko-ai/towards_large_pathology_fms
``hubconf.py`` builds timm's ``vit_small_patch16_224``, ``vit_small_patch8_224``,
``vit_base_patch16_224``, ``vit_base_patch8_224`` and ``vit_large_patch14_reg4_dinov2`` (its default
518 px grid, 4 registers) with ``dynamic_img_size=True`` and ``num_classes=0``: the embedding is timm's
token pool, the final LayerNorm's class token. The release weights are mirrored on the hub in timm's
layout (``1aurent/<arch>.kaiko_ai_towards_large_pathology_fms``), which TRIDENT loads.

Midnight-12k: huggingface.co/kaiko-ai/midnight is a transformers ``Dinov2Model`` ViT-g/14 (40 layers,
width 1536, 24 heads, SwiGLU 4096 hidden, layer scale), rebuilt here in timm at 224 px;
``hf_vit.from_transformers`` renames its keys and resamples its position embedding to the 16×16 grid
as transformers does for 224 px inputs. github.com/kaiko-ai/Midnight README: the classification
embedding is class token ++ mean of the patch tokens (3072-d).
"""

from __future__ import annotations

import timm
import torch
from timm.layers import SwiGLUPacked
from timm.models import VisionTransformer

from featurestore.encoders._config import TeacherConfig


def kaiko_vits16(config: TeacherConfig) -> VisionTransformer:
    """ViT-S/16 at 224 px (384 wide, 12 blocks), 1 class token."""
    return timm.create_model("vit_small_patch16_224", dynamic_img_size=True, num_classes=0)


def kaiko_vits8(config: TeacherConfig) -> VisionTransformer:
    """ViT-S/8 at 224 px (384 wide, 12 blocks), 1 class token."""
    return timm.create_model("vit_small_patch8_224", dynamic_img_size=True, num_classes=0)


def kaiko_vitb16(config: TeacherConfig) -> VisionTransformer:
    """ViT-B/16 at 224 px (768 wide, 12 blocks), 1 class token."""
    return timm.create_model("vit_base_patch16_224", dynamic_img_size=True, num_classes=0)


def kaiko_vitb8(config: TeacherConfig) -> VisionTransformer:
    """ViT-B/8 at 224 px (768 wide, 12 blocks), 1 class token."""
    return timm.create_model("vit_base_patch8_224", dynamic_img_size=True, num_classes=0)


def kaiko_vitl14(config: TeacherConfig) -> VisionTransformer:
    """DINOv2 ViT-L/14 with layer scale and 4 registers, built on a 37×37 grid (518 px), resampled per input."""
    return timm.create_model("vit_large_patch14_reg4_dinov2", dynamic_img_size=True, num_classes=0)


def midnight(config: TeacherConfig) -> VisionTransformer:
    """ViT-g/14 at 224 px: 40 blocks, width 1536, packed SwiGLU (8192 → 4096), layer scale, 1 class token."""
    return VisionTransformer(img_size=224, patch_size=14, embed_dim=1536, depth=40, num_heads=24,
                             mlp_ratio=5.33334, init_values=1.0, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU,
                             num_classes=0)
