"""Hibou-B and Hibou-L (HistAI): DINOv2 ViT/14s with 4 registers and SwiGLU, rebuilt in timm.

The hub ships a customised transformers Dinov2 (``Dinov2ModelWithRegisters``, loaded with
``trust_remote_code``); github.com/HistAI/hibou ``hibou/models/__init__.py::build_model`` builds the
same network in DINOv2's own code with ``ffn_layer="swiglufused"``, ``num_register_tokens=4``,
``patch_size=14``. huggingface.co/histai/hibou-b ``config.json``: hidden 768, 12 layers, 12 heads,
image 224, ``use_swiglu_ffn`` true (hidden ``(int(768·4·2/3) + 7) // 8 · 8`` = 2048), 4 registers,
layer scale, ``layer_norm_eps`` 1e-6. Hibou-L's ``config.json`` could not be read here: ViT-L/14
(1024 wide, 24 layers, 16 heads) with the same options is inferred from the paper and the repo's
defaults, and its published size (303.7 M parameters, LazySlide's registry; 304 M on the hub) fits
SwiGLU with a 2736 hidden width, not a plain 4096 MLP (303.2 M). A checkpoint that differs fails the
strict load and names the tensors.

The embedding TRIDENT and the eva benchmark take is ``pooler_output``, i.e. the final LayerNorm's
class token: timm's ``forward_features(x)[:, 0]``. ``hf_vit.from_transformers`` renames the keys.
"""

from __future__ import annotations

import torch
from timm.layers import SwiGLUPacked
from timm.models import VisionTransformer

from featurestore.encoders._config import TeacherConfig


def hibou_b(config: TeacherConfig) -> VisionTransformer:
    """ViT-B/14: 12 blocks, width 768, packed SwiGLU (2048 hidden), 1 class + 4 register tokens."""
    return _hibou(width=768, depth=12, heads=12, mlp_ratio=5.33334)


def hibou_l(config: TeacherConfig) -> VisionTransformer:
    """ViT-L/14: 24 blocks, width 1024, packed SwiGLU (2736 hidden = 5472 / 2), 1 class + 4 register tokens."""
    return _hibou(width=1024, depth=24, heads=16, mlp_ratio=5472 / 1024)


def _hibou(*, width: int, depth: int, heads: int, mlp_ratio: float) -> VisionTransformer:
    return VisionTransformer(img_size=224, patch_size=14, embed_dim=width, depth=depth, num_heads=heads,
                             mlp_ratio=mlp_ratio, init_values=1.0, reg_tokens=4, no_embed_class=True,
                             mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, num_classes=0)
