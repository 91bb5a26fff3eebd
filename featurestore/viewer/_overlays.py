"""Overlays drawn over a whole slide as transparent PNGs: the tissue mask, the tile grid, and tiles coloured
by a per-tile value (a quality score or a run's attention).

Each PNG spans the slide's full level-0 extent, so the client lays it over the deep zoom image at the same
viewport bounds. Values are shown as percentiles within the slide where their scale is open-ended
(sharpness, attention: CLAM's convention), and as they are where they are fractions in [0, 1].
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from featurestore.schemas import TilingSpec
from featurestore.slides import open_slide, tissue_mask

MAX_SIDE = 2048
"""Longest side of an overlay PNG: fine enough for tile outlines at the zooms where they are legible."""

FRACTIONS = ("tissue_fraction", "pen_fraction", "background_fraction", "annotation")

_VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float64)
GRID_COLOUR = (20, 20, 20, 200)
TISSUE_COLOUR = (0, 170, 90, 110)
ALPHA = 150


def colormap(values: np.ndarray) -> np.ndarray:
    """Viridis-like RGB for values in [0, 1] (the palette of ``fs train``'s attention heatmaps)."""
    pos = np.clip(values, 0, 1) * (len(_VIRIDIS) - 1)
    i = np.minimum(pos.astype(int), len(_VIRIDIS) - 2)
    frac = (pos - i)[:, None]
    return (_VIRIDIS[i] * (1 - frac) + _VIRIDIS[i + 1] * frac).astype(np.uint8)


def scaled(name: str, values: np.ndarray) -> np.ndarray:
    """Values mapped to [0, 1] for colouring: fractions as they are, others as percentiles; NaN stays NaN."""
    values = np.asarray(values, np.float64)
    if name in FRACTIONS:
        return values
    out = np.full(values.shape, np.nan)
    ok = ~np.isnan(values)
    if ok.any():
        ranks = np.argsort(np.argsort(values[ok], kind="stable"), kind="stable")
        out[ok] = (ranks + 0.5) / ok.sum()
    return out


def _canvas(width: int, height: int) -> tuple[Image.Image, float]:
    scale = min(1.0, MAX_SIDE / max(width, height))
    return Image.new("RGBA", (max(1, round(width * scale)), max(1, round(height * scale))), (0, 0, 0, 0)), scale


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def tile_layer(width: int, height: int, x: np.ndarray, y: np.ndarray, edge: int,
               values: np.ndarray | None) -> Image.Image:
    """Tile outlines (``values`` None), or tiles filled by ``values`` in [0, 1] (NaN: outline only)."""
    image, scale = _canvas(width, height)
    draw = ImageDraw.Draw(image)
    colours = None if values is None else colormap(np.nan_to_num(values))
    for i, (tx, ty) in enumerate(zip(x.tolist(), y.tolist(), strict=True)):
        box = (tx * scale, ty * scale, (tx + edge) * scale - 1, (ty + edge) * scale - 1)
        if colours is None or np.isnan(values[i]):
            draw.rectangle(box, outline=GRID_COLOUR)
        else:
            draw.rectangle(box, fill=(*(int(c) for c in colours[i]), ALPHA))
    return image


def tissue_layer(path: Path, spec: TilingSpec, mpp: float) -> Image.Image:
    """The tiling's tissue mask recomputed from the slide file, as tiling did (same spec, same µm/px)."""
    with open_slide(path) as reader:
        mask = tissue_mask(reader, spec, mpp=mpp)
        width, height = reader.dimensions
    rgba = np.zeros((*mask.mask.shape, 4), np.uint8)
    rgba[mask.mask] = TISSUE_COLOUR
    image, _ = _canvas(width, height)
    return Image.fromarray(rgba, "RGBA").resize(image.size, Image.Resampling.NEAREST)
