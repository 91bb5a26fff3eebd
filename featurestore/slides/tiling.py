"""Tile grids defined in physical units, and reading their pixels.

A tile shows ``spec.tile_size * spec.target_mpp`` µm of tissue whatever the
scanner's resolution, so one tiling means the same thing on every slide.

Geometry (all in level-0 pixels, from the slide's µm/px along x, ``mpp``; square
pixels are assumed, which holds for whole-slide scanners to well under 1%):

* footprint ``F = round(tile_size * target_mpp / mpp)``;
* stride ``S = (tile_size - overlap) * target_mpp / mpp``, kept fractional, and
  tile ``i``'s origin is ``floor(i * S + 0.5)``, so rounding never accumulates;
* the grid starts at (0, 0) and tiles are numbered row-major (y, then x);
* when tiles are read from a level other than 0, origins are snapped down to a
  whole pixel of that level (a multiple of its downsample), because OpenSlide
  resamples sub-pixel offsets while cuCIM truncates them: snapped, both backends
  read identical pixels.

Edge policy: ``drop`` keeps only tiles lying wholly inside the slide; ``pad``
keeps every tile whose origin lies inside the slide, and the reader fills the
part beyond the slide with white.

Reads come from the coarsest level at or finer than the target resolution
(never upsampling), ``read_size = round(F / level_downsample)`` pixels square,
then resized to the encoder's input size.

Tissue fraction is the share of the tile's footprint covered by the tissue mask
(area beyond the slide counts as background), from an integral image in one
vectorised pass; tiles below ``spec.min_tissue`` are dropped. With
``tissue_method='none'`` every tile has fraction 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from featurestore.schemas.records import EdgePolicy, TilingSpec
from featurestore.slides.base import SlideReader, best_level
from featurestore.slides.tissue import TissueMask, thumbnail


class Geometry(Protocol):
    """What tiling needs to know about a slide; every ``SlideReader`` has it."""

    @property
    def dimensions(self) -> tuple[int, int]: ...

    @property
    def level_downsamples(self) -> tuple[float, ...]: ...


@dataclass(frozen=True, slots=True)
class SlideGeometry:
    """A slide's level-0 size and level downsamples, to plan a grid without opening the file."""

    dimensions: tuple[int, int]
    level_downsamples: tuple[float, ...] = (1.0,)


@dataclass(frozen=True, slots=True, eq=False)
class TileGrid:
    """Kept tiles of one slide: level-0 origins, tissue fractions, and how to read them.

    ``footprint`` is a tile's edge and ``stride`` the (fractional) step between
    tile origins, both in level-0 pixels; ``read_size`` is a tile's edge at
    ``level``; ``downsample_to_target`` = read_size / tile_size, the resize factor
    from the read to the tiling's resolution.
    """

    x: np.ndarray
    y: np.ndarray
    tissue_fraction: np.ndarray
    level: int
    read_size: int
    footprint: int
    stride: float
    downsample_to_target: float

    def __len__(self) -> int:
        return len(self.x)

    def with_coordinates(self, x: np.ndarray, y: np.ndarray) -> TileGrid:
        """These read settings with other tile origins, e.g. those a store already holds for this tiling.

        Tissue fractions are not recomputed (NaN): the stored tiles table keeps them.
        """
        x, y = np.asarray(x, dtype=np.int64), np.asarray(y, dtype=np.int64)
        return replace(self, x=x, y=y, tissue_fraction=np.full(len(x), np.nan, dtype=np.float32))

    def coarsen(self, k: int) -> TileGrid:
        """A grid of tiles covering exactly k × k of these tiles, for pairs across magnifications.

        Needs a grid without overlap. A coarse tile is kept when it contains a kept
        tile; its tissue fraction is the sum of its kept tiles' fractions / k². It
        is read at this grid's level (never upsampling), ``k × read_size`` pixels
        square, and resized by ``read_tiles``.
        """
        if k < 1 or self.footprint > round(self.stride):
            raise ValueError(f"coarsen needs k >= 1 and a grid without overlap, got k={k}")
        i = np.round(self.x / self.stride).astype(np.int64) // k
        j = np.round(self.y / self.stride).astype(np.int64) // k
        cells, inverse = np.unique(np.stack([j, i], axis=1), axis=0, return_inverse=True)
        fraction = np.bincount(inverse.ravel(), weights=self.tissue_fraction, minlength=len(cells)) / k**2
        stride = self.stride * k
        origins = np.floor(cells * stride + 0.5).astype(np.int64)
        return TileGrid(x=origins[:, 1], y=origins[:, 0], tissue_fraction=fraction.astype(np.float32),
                        level=self.level, read_size=self.read_size * k, footprint=self.footprint * k,
                        stride=stride, downsample_to_target=self.downsample_to_target)


def _origins(extent: int, stride: float, footprint: int, edge: EdgePolicy) -> np.ndarray:
    origins = np.floor(np.arange(int(np.ceil(extent / stride)) + 1) * stride + 0.5).astype(np.int64)
    inside = origins + footprint <= extent if edge == "drop" else origins < extent
    return origins[inside]


def _tissue_fraction(mask: TissueMask, dimensions: tuple[int, int], x: np.ndarray, y: np.ndarray,
                     footprint: int) -> np.ndarray:
    m = mask.mask
    mh, mw = m.shape
    integral = np.zeros((mh + 1, mw + 1), dtype=np.int64)
    integral[1:, 1:] = m.cumsum(0, dtype=np.int64).cumsum(1)
    sx, sy = mw / dimensions[0], mh / dimensions[1]
    c0 = np.round(x * sx).astype(np.int64)
    r0 = np.round(y * sy).astype(np.int64)
    c1 = np.maximum(np.round((x + footprint) * sx).astype(np.int64), c0 + 1)
    r1 = np.maximum(np.round((y + footprint) * sy).astype(np.int64), r0 + 1)
    cc0, cc1 = np.clip(c0, 0, mw), np.clip(c1, 0, mw)
    rr0, rr1 = np.clip(r0, 0, mh), np.clip(r1, 0, mh)
    tissue = integral[rr1, cc1] - integral[rr0, cc1] - integral[rr1, cc0] + integral[rr0, cc0]
    return (tissue / ((c1 - c0) * (r1 - r0))).astype(np.float32)


def tile_grid(slide: Geometry, spec: TilingSpec, mask: TissueMask | None, *, mpp: float) -> TileGrid:
    """The kept tiles of ``slide`` (a reader or a :class:`SlideGeometry`) at level-0 µm/px ``mpp`` (x axis).

    ``mpp`` is explicit because it may be assumed rather than read from the file.
    ``mask`` may be None only with ``tissue_method='none'``.
    """
    if mask is None and spec.tissue_method != "none":
        raise ValueError(f"tile_grid needs a tissue mask when tissue_method is {spec.tissue_method!r}; compute "
                         "one with tissue_mask()")
    width, height = slide.dimensions
    downsamples = slide.level_downsamples
    scale = spec.target_mpp / mpp
    footprint = max(1, round(spec.tile_size * scale))
    stride = spec.stride * scale
    level = best_level(downsamples, scale)
    snap = max(1, round(downsamples[level]))
    xs = _origins(width, stride, footprint, spec.edge) // snap * snap
    ys = _origins(height, stride, footprint, spec.edge) // snap * snap
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    x, y = xx.ravel(), yy.ravel()
    if mask is None or spec.tissue_method == "none":
        fraction = np.ones(len(x), dtype=np.float32)
    else:
        fraction = _tissue_fraction(mask, (width, height), x, y, footprint)
    keep = fraction >= spec.min_tissue
    read_size = max(1, round(spec.tile_size * scale / downsamples[level]))
    return TileGrid(x=x[keep], y=y[keep], tissue_fraction=fraction[keep], level=level, read_size=read_size,
                    footprint=footprint, stride=stride, downsample_to_target=read_size / spec.tile_size)


def read_tiles(reader: SlideReader, grid: TileGrid, indices: Sequence[int] | np.ndarray, out_size: int,
               *, num_workers: int = 1) -> np.ndarray:
    """Pixels of tiles ``indices`` of ``grid`` as (n, out_size, out_size, 3) uint8.

    Resizing uses Pillow's bilinear filter, which widens its kernel when shrinking,
    so downscaled tiles are antialiased rather than aliased.
    """
    idx = np.asarray(indices, dtype=np.int64)
    locations = list(zip(grid.x[idx].tolist(), grid.y[idx].tolist(), strict=True))
    regions = reader.read_regions(locations, grid.level, (grid.read_size, grid.read_size),
                                  num_workers=num_workers)
    if grid.read_size == out_size:
        return regions
    out = np.empty((len(idx), out_size, out_size, 3), dtype=np.uint8)
    for i, region in enumerate(regions):
        out[i] = np.asarray(Image.fromarray(region).resize((out_size, out_size), Image.BILINEAR,
                                                           reducing_gap=3.0))
    return out


def qc_overlay(reader: SlideReader, mask: TissueMask, grid: TileGrid, path: str | Path,
               *, max_side: int = 1024) -> Path:
    """Write a PNG for a person to check: thumbnail, tissue tinted green and outlined, kept tiles in blue."""
    width, height = reader.dimensions
    rgb = thumbnail(reader, max(1.0, max(width, height) / max_side)).copy()
    h, w = rgb.shape[:2]
    tissue = np.asarray(Image.fromarray(mask.mask).resize((w, h), Image.NEAREST), dtype=bool)
    rgb[tissue] = (0.7 * rgb[tissue] + 0.3 * np.array([0, 200, 0])).astype(np.uint8)
    rgb[tissue & ~ndimage.binary_erosion(tissue)] = (0, 120, 0)
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    sx, sy = w / width, h / height
    for x0, y0 in zip(grid.x.tolist(), grid.y.tolist(), strict=True):
        draw.rectangle([x0 * sx, y0 * sy, (x0 + grid.footprint) * sx - 1, (y0 + grid.footprint) * sy - 1],
                       outline=(0, 0, 255))
    out = Path(path)
    image.save(out, format="PNG")
    return out
