"""Where models run: ``auto``, ``cpu`` or ``cuda[:N]``, and the mixed precision that goes with the device.

Shared by stage one (``fs extract``) and stage two (training, prediction, distillation). On CUDA,
forward passes autocast to bfloat16 where the GPU supports it, else to float16, which training pairs
with loss scaling (``grad_scaler``); on CPU nothing is autocast, so a fixed seed reproduces a run bit
for bit. Importing this module does not import torch: configs check a device name without it.
"""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING

from featurestore.schemas import FsError

if TYPE_CHECKING:
    import torch

DEVICE_NAMES = "auto, cpu or cuda[:N]"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class DeviceError(FsError, ValueError):
    """A device name is malformed or names a device this machine does not have."""

    field = "device"


def check_device(name: str) -> str:
    """``name`` when it is a device name this module understands (the device may still be absent)."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise DeviceError(f"device must be {DEVICE_NAMES}, got {name!r}")
    return name


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when one is visible, else the CPU; a CUDA device that is not
    visible is an error rather than a failure deep inside the first forward pass."""
    import torch

    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r}: no CUDA device is visible; use 'cpu' or 'auto'")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype on ``device``: bfloat16 or float16 on CUDA, None (full precision) elsewhere."""
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for forward passes on ``device`` (a no-op on CPU)."""
    import torch

    dtype = amp_dtype(device)
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for float16 autocast (bfloat16 needs none); disabled, it passes losses and steps through."""
    import torch

    return torch.amp.GradScaler("cuda", enabled=amp_dtype(device) == torch.float16)
