"""CTransPath (Wang et al., Med. Image Anal. 2022): a Swin-T whose patch embedding is a small convolutional stem.

github.com/Xiyue-Wang/TransPath ``ctran.py``, as TRIDENT vendors it
(``patch_encoder_models/model_zoo/ctranspath/ctran.py``): ``swin_tiny_patch4_window7_224`` of the
``timm_ctp`` fork (timm 0.5.4) with ``embed_layer=ConvStem`` and the head replaced by an identity, so
the embedding is the mean of the final, normalised tokens (768-d). ``ConvStem`` is rewritten here
with the same parameter names for today's timm, which calls the patch embedding with extra keyword
arguments and expects channels-last ``(B, H, W, C)`` tokens.

The checkpoint (TRIDENT: ``CHIEF_CTransPath.pth`` under ``{"model": ...}``) is in timm 0.5.4's Swin
layout: each stage ends with its downsampling and the attention masks and relative-position indices
are stored. ``from_timm_0_5`` applies timm's own Swin ``checkpoint_filter_fn``, which moves each
downsampling to the start of the next stage and drops those buffers (timm recomputes them).
"""

from __future__ import annotations

import timm
import torch
from timm.models import SwinTransformer
from timm.models.swin_transformer import checkpoint_filter_fn
from torch import nn

from featurestore.encoders._config import TeacherConfig


class ConvStem(nn.Module):
    """Two stride-2 3×3 conv-BN-ReLU layers and a 1×1 projection: a 4× downsampling patch embedding."""

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 norm_layer: type[nn.Module] | None = None, strict_img_size: bool = True, output_fmt: str = "NHWC",
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        stem: list[nn.Module] = []
        width_in, width_out = in_chans, embed_dim // 8
        for _ in range(2):
            stem += [nn.Conv2d(width_in, width_out, kernel_size=3, stride=2, padding=1, bias=False, **dd),
                     nn.BatchNorm2d(width_out, **dd), nn.ReLU(inplace=True)]
            width_in, width_out = width_out, width_out * 2
        stem.append(nn.Conv2d(width_in, embed_dim, kernel_size=1, **dd))
        self.proj = nn.Sequential(*stem)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def ctranspath(config: TeacherConfig) -> SwinTransformer:
    """Swin-T (depths 2-2-6-2, width 96, window 7) at 224 px on the conv stem; pooled 768-d output."""
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=224, embed_layer=ConvStem, num_classes=0)


def from_timm_0_5(state: dict[str, torch.Tensor], model: SwinTransformer) -> dict[str, torch.Tensor]:
    """timm 0.5's Swin layout → today's (timm's own conversion of original Swin checkpoints)."""
    return checkpoint_filter_fn(state, model)
