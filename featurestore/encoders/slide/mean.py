"""Mean pooling: the slide embedding is the average of its tile embeddings (no weights)."""

from __future__ import annotations

import torch
from torch import nn

from featurestore.encoders.slide._config import SlideEncoderConfig


class MeanPool(nn.Module):
    def encode(self, features: torch.Tensor, coords: torch.Tensor, patch_size_lv0: int) -> torch.Tensor:
        return features.float().mean(0, keepdim=True)


def mean_pool(config: SlideEncoderConfig, in_dim: int) -> MeanPool:
    return MeanPool()
