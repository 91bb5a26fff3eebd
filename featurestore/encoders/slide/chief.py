"""CHIEF's slide aggregator (github.com/hms-dbmi/CHIEF, ``models/CHIEF.py``, ``size_arg="small"``).

Module names follow the vendor's, so ``CHIEF_pretraining.pth`` loads strictly: the slide path is
``attention_net`` (Linear 768→512, ReLU, Dropout, gated attention 512→256→1); the classifier, the
instance classifiers, the attention head and the organ text embedding are trained parts of the
checkpoint that the slide embedding does not use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featurestore.encoders.slide._config import SlideEncoderConfig

SMALL = (768, 512, 256)
ORGANS = 19


class GatedAttention(nn.Module):
    """CHIEF's ``Attn_Net_Gated``: tanh and sigmoid branches multiplied, one score per tile; passes ``x`` on."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Dropout(0.25))
        self.attention_b = nn.Sequential(nn.Linear(width, hidden), nn.Sigmoid(), nn.Dropout(0.25))
        self.attention_c = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attention_c(self.attention_a(x) * self.attention_b(x)), x


class AttentionHead(nn.Module):
    """CHIEF's ``Att_Head`` (kept for the strict load)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, 1)


class Chief(nn.Module):
    def __init__(self, n_classes: int = 2) -> None:
        super().__init__()
        features, width, hidden = SMALL
        self.attention_net = nn.Sequential(nn.Linear(features, width), nn.ReLU(), nn.Dropout(0.25),
                                           GatedAttention(width, hidden))
        self.classifiers = nn.Linear(width, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(width, 2) for _ in range(n_classes))
        self.att_head = AttentionHead(width, hidden)
        self.text_to_vision = nn.Sequential(nn.Linear(768, width), nn.ReLU(), nn.Dropout(0.25))
        self.register_buffer("organ_embedding", torch.zeros(ORGANS, 768))

    def encode(self, features: torch.Tensor, coords: torch.Tensor, patch_size_lv0: int) -> torch.Tensor:
        """``forward(h, x_anatomic)["WSI_feature"]``: softmax attention over tiles, then the weighted sum."""
        scores, h = self.attention_net(features)
        attention = F.softmax(scores.transpose(1, 0), dim=1)
        return attention @ h


def chief(config: SlideEncoderConfig, in_dim: int) -> Chief:
    return Chief()
