"""Deep tissue segmenters (HEST, GrandQC) run at their native resolution on a slide thumbnail.

Both follow TRIDENT (``trident/segmentation_models/load.py``: ``HESTSegmenter``, ``GrandQCSegmenter``),
which hosts both checkpoints in the Hugging Face repo ``MahmoodLab/hest-tissue-seg``:

- ``hest``: torchvision DeepLabV3-ResNet50, 2 classes, no auxiliary head (TRIDENT drops the
  checkpoint's ``aux`` keys and the ``model.`` prefix of its Lightning ``state_dict``), 10x
  (1 µm/px), 512 px tiles, ToTensor + ImageNet mean/std, float16 on a GPU; tissue where
  softmax class 1 > 0.5.
- ``grandqc``: segmentation_models_pytorch ``UnetPlusPlus`` with the ``timm-efficientnet-b0`` encoder,
  2 classes, 1x (10 µm/px, the ``MPP10`` of its file name), 512 px tiles, a JPEG round trip at
  quality 80 (GrandQC was trained on JPEG-compressed tiles) then ToTensor + ImageNet mean/std,
  float32; the predicted class is the argmax and class 0 is tissue (TRIDENT keeps
  ``max_prob >= 0.5`` and ``1 - class``; with two classes the maximum is always ≥ 0.5).

TRIDENT's JPEG step hands an RGB array to OpenCV, which takes it for BGR; the colour conversion
inside the encoder therefore sees the channels reversed, which is reproduced here with Pillow.
The thumbnail is cut into the model's tiles, padded with white (glass) at the right and bottom
edges, and the per-pixel prediction is box-resampled onto the Otsu mask's grid, so tiling and the
QC overlay take a :class:`TissueMask` whatever made it.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featurestore.schemas.errors import MissingDependencyError, ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_REPO = "MahmoodLab/hest-tissue-seg"
WHITE = 255


@dataclass(frozen=True)
class SegmenterConfig:
    """One tissue segmenter: its checkpoint, the resolution and tile it runs on, and how to read its output."""

    name: str
    filename: str
    mpp: float
    tile: int
    tissue_class: int
    jpeg_quality: int | None
    gpu_dtype: torch.dtype
    build: Callable[[], torch.nn.Module]
    hub_id: str = HUB_REPO


def _deeplabv3() -> torch.nn.Module:
    from torchvision.models.segmentation import deeplabv3_resnet50

    # TRIDENT replaces classifier[4] by a 2-class 1x1 conv: the same keys and shapes as num_classes=2.
    return deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=2, aux_loss=False)


def _unetplusplus() -> torch.nn.Module:
    try:
        import segmentation_models_pytorch as smp
    except ModuleNotFoundError as err:
        raise MissingDependencyError("grandqc: the GrandQC tissue model needs segmentation_models_pytorch; "
                                     "pip install segmentation-models-pytorch, or use --tissue otsu") from err
    with warnings.catch_warnings():
        # smp deprecates the ``timm-`` encoders, but the checkpoint's keys are this encoder's.
        warnings.filterwarnings("ignore", message="`timm-` encoders are deprecated", category=DeprecationWarning)
        return smp.UnetPlusPlus(encoder_name="timm-efficientnet-b0", encoder_weights=None, classes=2,
                                activation=None)


SEGMENTERS: dict[str, SegmenterConfig] = {
    "hest": SegmenterConfig("hest", "deeplabv3_seg_v4.ckpt", mpp=1.0, tile=512, tissue_class=1,
                            jpeg_quality=None, gpu_dtype=torch.float16, build=_deeplabv3),
    "grandqc": SegmenterConfig("grandqc", "Tissue_Detection_MPP10.pth", mpp=10.0, tile=512, tissue_class=0,
                               jpeg_quality=80, gpu_dtype=torch.float32, build=_unetplusplus),
}


def segmenter_config(name: str) -> SegmenterConfig:
    if name not in SEGMENTERS:
        raise ModelError(f"unknown tissue segmenter {name!r}; choose one of {sorted(SEGMENTERS)}")
    return SEGMENTERS[name]


def locate_weights(config: SegmenterConfig, weights: str | Path | None) -> Path:
    """The checkpoint: ``weights`` (a file, or a folder holding the published file name), else the hub cache/hub."""
    fix = f"pass --tissue-weights PATH to {config.filename}, or use --tissue otsu"
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir():
            path = path / config.filename
        if not path.is_file():
            raise ModelError(f"{config.name}: tissue weights {path} do not exist; {fix}")
        return path
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    where = {"repo_id": config.hub_id, "filename": config.filename, "token": os.environ.get("HF_TOKEN")}
    try:
        return Path(hf_hub_download(**where, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline:
        raise ModelError(f"{config.name}: {config.hub_id}/{config.filename} is not in the Hugging Face cache and "
                         f"HF_HUB_OFFLINE is set; download it once online or {fix}")
    try:
        return Path(hf_hub_download(**where))
    except OSError as err:  # hub errors (gated, missing, unreachable) are OSErrors
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{config.name}: cannot fetch {config.hub_id}/{config.filename} ({reason}); {fix}") from err


def read_checkpoint(config: SegmenterConfig, path: Path) -> dict[str, torch.Tensor]:
    """The tensors under the module's keys: a plain state dict (GrandQC) or a Lightning ``state_dict`` whose
    ``model.`` prefix and auxiliary head TRIDENT drops (HEST). Read with ``weights_only``: no code runs."""
    fix = f"pass --tissue-weights PATH to a {config.name} checkpoint ({config.filename})"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{config.name}: cannot read tissue weights {path} ({reason}); {fix}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{config.name}: {path} holds no state dict of tensors; {fix}")
    return {k.removeprefix("model."): v for k, v in state.items() if "aux" not in k}


def load_strict(config: SegmenterConfig, model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict(strict=True)``, a mismatch reported on one line with examples."""
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        raise ModelError(f"{config.name}: {path.name} does not fit the {config.name} architecture ({len(missing)} "
                         f"missing e.g. {missing[:2]}, {len(unexpected)} unexpected e.g. {unexpected[:2]}, "
                         f"{len(reshaped)} of the wrong shape e.g. {reshaped[:2]}); pass --tissue-weights PATH to "
                         f"{config.filename}")
    model.load_state_dict(state, strict=True)


@functools.lru_cache(maxsize=4)
def load_segmenter(name: str, weights: str | None, device: str = "cpu") -> torch.nn.Module:
    """The segmenter in eval mode on ``device``, its checkpoint loaded strictly; cached across slides."""
    config = segmenter_config(name)
    path = locate_weights(config, weights)
    model = config.build()
    load_strict(config, model, read_checkpoint(config, path), path)
    return model.eval().requires_grad_(False).to(device)


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """GrandQC's ``cv2.imencode``/``imdecode`` of an RGB array that OpenCV takes for BGR, done with Pillow."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb[..., ::-1])).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))[..., ::-1]


def preprocess(config: SegmenterConfig, tiles: np.ndarray) -> torch.Tensor:
    """(n, h, w, 3) uint8 tiles → (n, 3, h, w) float32, as the vendor's eval transform makes them."""
    if config.jpeg_quality is not None:
        tiles = np.stack([jpeg_roundtrip(t, config.jpeg_quality) for t in tiles])
    x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).float().div(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out["out"] if isinstance(out, dict) else out  # torchvision segmentation models return a dict


def tissue_from_logits(config: SegmenterConfig, logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel tissue (n, h, w) by the vendor's rule."""
    probs = torch.softmax(logits.float(), dim=1)
    if config.tissue_class == 1:
        return probs[:, 1] > 0.5
    return probs.argmax(dim=1) == config.tissue_class


@torch.inference_mode()
def segment(model: torch.nn.Module, config: SegmenterConfig, rgb: np.ndarray, *, batch_size: int = 8) -> np.ndarray:
    """Boolean tissue mask of a thumbnail ``rgb`` (h, w, 3) already at ``config.mpp``."""
    h, w = rgb.shape[:2]
    t = config.tile
    rows, cols = -(-h // t), -(-w // t)
    padded = np.full((rows * t, cols * t, 3), WHITE, dtype=np.uint8)
    padded[:h, :w] = rgb
    tiles = padded.reshape(rows, t, cols, t, 3).transpose(0, 2, 1, 3, 4).reshape(-1, t, t, 3)
    device = next(model.parameters()).device
    dtype = config.gpu_dtype if device.type == "cuda" else torch.float32
    out = []
    for start in range(0, len(tiles), batch_size):
        x = preprocess(config, tiles[start:start + batch_size]).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out.append(tissue_from_logits(config, _logits(model, x)).cpu().numpy())
    mask = np.concatenate(out).reshape(rows, cols, t, t).transpose(0, 2, 1, 3).reshape(rows * t, cols * t)
    return mask[:h, :w]


def resample(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``mask`` box-resampled to ``size`` (w, h): a pixel is tissue when at least half its footprint is."""
    image = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.BOX)
    return np.asarray(image) >= 128
