"""Tissue detection on a low-resolution thumbnail, in physical units.

Stained tissue is coloured and glass is grey-white, so HSV saturation separates
them across stains and scanners better than brightness does. Every size
(thumbnail resolution, closing radius, smallest object) is given in µm and
converted with the slide's µm/px, so the same ``TilingSpec`` behaves the same on
a 20x and a 40x scan. Steps: thumbnail at about ``spec.thumbnail_mpp``;
saturation on 0-255; tissue where saturation > max(Otsu threshold,
``spec.saturation_floor``) (the floor stops Otsu from splitting noise on a
tissue-free slide); closing with a disk of ``spec.close_um``; hole filling;
removal of 8-connected objects smaller than ``spec.min_object_um2``.

``tissue_method`` ``hest`` or ``grandqc`` runs that deep segmenter instead (see
:mod:`featurestore.slides.segmenters`) on a thumbnail at the model's own µm/px, and
resamples its mask onto the same grid, so the result is the same :class:`TissueMask`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from featurestore.schemas.errors import MissingMppError
from featurestore.schemas.records import TilingSpec
from featurestore.slides.base import SlideReader


@dataclass(frozen=True, slots=True, eq=False)
class TissueMask:
    """Boolean tissue mask of a whole slide (row = y) and its scale.

    ``downsample`` is level-0 pixels per mask pixel along x (y differs by under a
    mask pixel over the whole slide, from rounding the mask size); ``mpp`` is µm
    per mask pixel. ``mask`` is held as a read-only view so the record stays frozen.
    """

    mask: np.ndarray
    mpp: float
    downsample: float

    def __post_init__(self) -> None:
        view = np.asarray(self.mask, dtype=bool).view()
        view.setflags(write=False)
        object.__setattr__(self, "mask", view)

    @property
    def fraction(self) -> float:
        """Share of the slide's area that is tissue."""
        return float(self.mask.mean())


def resolve_mpp(reader: SlideReader, mpp: float | None) -> float:
    """Level-0 µm/px along x: the caller's assumed value, else the file's; never a silent default."""
    if mpp is not None:
        return float(mpp)
    if reader.mpp is None:
        raise MissingMppError(f"{reader.path}: the file records no µm/px; pass an assumed mpp (--assume-mpp)")
    return reader.mpp[0]


def _mask_size(reader: SlideReader, downsample: float) -> tuple[int, int]:
    width, height = reader.dimensions
    return max(1, round(width / downsample)), max(1, round(height / downsample))


def thumbnail(reader: SlideReader, downsample: float) -> np.ndarray:
    """Whole slide as RGB at about ``downsample`` × level 0.

    Reads the coarsest level at or finer than that, then box-filters down, so the
    result is antialiased whatever levels the file has.
    """
    level = reader.best_level_for_downsample(downsample)
    image = reader.read_region((0, 0), level, reader.level_dimensions[level])
    return np.asarray(Image.fromarray(image).resize(_mask_size(reader, downsample), Image.BOX))


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 ``values``: the t maximising between-class variance of {<= t} vs {> t}."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    return int(np.argmax(np.nan_to_num(between, nan=0.0, posinf=0.0)))


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return xx * xx + yy * yy <= radius * radius


def tissue_mask(reader: SlideReader, spec: TilingSpec, *, mpp: float | None = None,
                weights: str | None = None, device: str = "cpu") -> TissueMask:
    """Tissue mask of ``reader``'s slide at about ``spec.thumbnail_mpp`` µm/px.

    ``mpp`` overrides the file's level-0 µm/px, for slides whose resolution is
    assumed; without either, :class:`MissingMppError` is raised because every
    threshold here is physical. ``tissue_method='none'`` gives an all-true mask
    without reading pixels. ``weights`` (a checkpoint, else the hub cache) and
    ``device`` are for the deep segmenters only.
    """
    mpp0 = resolve_mpp(reader, mpp)
    target = spec.thumbnail_mpp / mpp0
    width, height = _mask_size(reader, target)
    downsample = reader.dimensions[0] / width
    mask_mpp = mpp0 * downsample
    if spec.tissue_method == "none":
        return TissueMask(np.ones((height, width), dtype=bool), mask_mpp, downsample)
    if spec.tissue_method != "otsu":
        from featurestore.slides.segmenters import load_segmenter, resample, segment, segmenter_config

        config = segmenter_config(spec.tissue_method)  # torch is imported only for a deep segmenter
        model = load_segmenter(config.name, weights, device)
        native = segment(model, config, thumbnail(reader, config.mpp / mpp0))
        return TissueMask(resample(native, (width, height)), mask_mpp, downsample)
    rgb = thumbnail(reader, target)
    saturation = np.asarray(Image.fromarray(rgb).convert("HSV"))[..., 1]
    threshold = max(otsu_threshold(saturation), spec.saturation_floor)
    mask = saturation > threshold
    radius = round(spec.close_um / mask_mpp)
    if radius >= 1:
        padded = np.pad(mask, radius)  # so closing does not erode tissue that touches the border
        mask = ndimage.binary_closing(padded, structure=_disk(radius))[radius:-radius, radius:-radius]
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n:
        keep = np.bincount(labels.ravel()) * mask_mpp**2 >= spec.min_object_um2
        keep[0] = False
        mask = keep[labels]
    return TissueMask(np.ascontiguousarray(mask, dtype=bool), mask_mpp, downsample)
