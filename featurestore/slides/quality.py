"""Per-tile quality measures: focus, pen ink and background, cheap enough to run on every tile read.

All three are computed on the tile as the encoder sees it (``tile_size`` px at ``target_mpp``), so a
threshold means the same thing on every scanner.

* **sharpness**: variance of the 4-neighbour Laplacian of the grey levels (ITU-R BT.601 luma, 0-255),
  the focus measure of Pech-Pacheco et al., "Diatom autofocusing in brightfield microscopy: a
  comparative study", ICPR 2000. Out-of-focus tiles lose the high frequencies the Laplacian responds
  to; so do empty ones (glass is flat), so it is low for both.
* **pen_fraction**: share of pixels in ink colours. Blue and green ink are the RGB threshold boxes of
  the pen filters of deephistopath (D. Eriksson, IBM, "python-wsi-preprocessing", ``filter_blue_pen`` and
  ``filter_green_pen``), which histolab ships unchanged: a pixel is blue ink when
  ``r < R and g < G and b > B`` and green ink when ``r < R and g > G and b > B`` for any listed
  ``(R, G, B)``; tissue-marking dye in those colours counts too. Black ink, which those filters leave
  out, is dark and grey: every channel below ``BLACK_MAX`` and channels within ``BLACK_CHROMA`` of
  each other; hematoxylin keeps nuclei purple, so few of their pixels pass as grey. The darkest
  nuclear pixels do meet the dark-blue boxes one by one, which leaves H&E tiles at a few percent at
  most. Red ink is left out on purpose: its boxes overlap eosin and red blood cells.
* **background_fraction**: share of bright, grey pixels (every channel at least ``BACKGROUND_MIN``
  and channels within ``BACKGROUND_CHROMA`` of each other): glass and the white padding beyond a
  slide's edge. Like the tissue mask, it calls unsaturated pixels background; bright pixels are
  counted as background before ink, so a slightly tinted glass never reads as light-green ink.

The pen boxes collapse into one 256 × 256 table (see ``ink_floor``), so the colour tests cost a few
uint8 operations per pixel; they are estimated on every other row and column (a quarter of the
pixels, an error far below any useful threshold), while sharpness uses every pixel, since blur lives
in the finest detail. Tiles are measured one at a time, so the working set stays in cache.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np

from featurestore.schemas.errors import InvalidArgumentError
from featurestore.schemas.records import QUALITY_DEFAULTS, TilingSpec
from featurestore.schemas.tables import TileQuality
from featurestore.slides.tiling import TileGrid

BLUE_PEN: tuple[tuple[int, int, int], ...] = (
    (60, 120, 190), (120, 170, 200), (175, 210, 230), (145, 180, 210), (37, 95, 160), (30, 65, 130),
    (130, 155, 180), (40, 35, 85), (30, 20, 65), (90, 90, 140), (60, 60, 120), (110, 110, 175),
)
"""deephistopath's blue pen boxes: ink when r < R, g < G and b > B."""

GREEN_PEN: tuple[tuple[int, int, int], ...] = (
    (150, 160, 140), (70, 110, 110), (45, 115, 100), (30, 75, 60), (195, 220, 210), (225, 230, 225),
    (170, 210, 200), (20, 30, 20), (50, 60, 40), (30, 50, 35), (65, 70, 60), (100, 110, 105),
    (165, 180, 180), (140, 140, 150), (185, 195, 195),
)
"""deephistopath's green pen boxes: ink when r < R, g > G and b > B."""

QUALITY_OPTIONS: dict[str, str] = {"sharpness": "min_sharpness", "pen": "max_pen", "background": "max_background"}
"""``--min-quality`` names of the ``TilingSpec`` limits."""

DEFAULT_LIMITS: dict[str, float] = {"sharpness": 60.0, "pen": 0.05, "background": 0.9}
"""``--min-quality default``, from the tiles of an H&E slide at 0.5 µm/px (CMU-1-Small-Region): its tissue
tiles measure sharpness 530-3760, the same tiles Gaussian-blurred with σ = 1.5 px 21-131 and with σ = 2 px
(1 µm) 8-55, glass under 30. Its H&E tiles have pen fractions under 0.03 (dark nuclei), the tiles its
marking dye crosses up to 0.08, and a stroke of ink covers far more. Tiles over 90% glass carry little
tissue; the tissue mask already drops those under 25% tissue."""

BLACK_MAX = 60
BLACK_CHROMA = 15
BACKGROUND_MIN = 200
BACKGROUND_CHROMA = 30

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@cache
def ink_floor() -> np.ndarray:
    """For each (r, g), indexed ``r << 8 | g``, the blue level above which the colour is blue or green ink.

    Each pen box is a half-space in blue over a rectangle in (red, green), so the union of the boxes is
    "b above the smallest B whose rectangle holds (r, g)"; 255 where none does.
    """
    v = np.arange(256, dtype=np.int16)
    r, g = v[:, None], v[None, :]
    floor = np.full((256, 256), 255, dtype=np.uint8)
    for boxes, green in ((BLUE_PEN, False), (GREEN_PEN, True)):
        for red, grn, blue in boxes:
            holds = (r < red) & ((g > grn) if green else (g < grn))
            floor[holds] = np.minimum(floor[holds], blue)
    return floor.reshape(-1)


def inside_slide(grid: TileGrid, dimensions: tuple[int, int], indices: np.ndarray, size: int) -> np.ndarray:
    """(n, 2) rows and columns of tiles ``indices`` of ``grid``, read at ``size`` px, that show the slide.

    The rest is the white padding beyond the slide's right or bottom edge (``edge='pad'``).
    """
    idx = np.asarray(indices, dtype=np.int64)
    width, height = dimensions
    extent = np.stack([(height - grid.y[idx]) / grid.footprint, (width - grid.x[idx]) / grid.footprint], axis=1)
    return np.floor(np.clip(extent, 0.0, 1.0) * size).astype(np.int64)


def sharpness(pixels: np.ndarray, inside: np.ndarray | None = None) -> np.ndarray:
    """Variance of the 4-neighbour Laplacian of each tile's luma, over its interior pixels: (n,) float64.

    With ``inside`` (see ``inside_slide``), only the part of each tile on the slide counts: the step
    from tissue to edge padding is as sharp as any nucleus whatever the focus. Under 3 × 3 px, 0.
    """
    out = np.zeros(len(pixels), dtype=np.float64)
    for i, tile in enumerate(pixels):
        if inside is not None:
            tile = tile[:inside[i, 0], :inside[i, 1]]
            if min(tile.shape[:2]) < 3:
                continue
        grey = tile.astype(np.float32) @ _LUMA
        lap = grey[:-2, 1:-1] + grey[2:, 1:-1]
        lap += grey[1:-1, :-2]
        lap += grey[1:-1, 2:]
        lap -= 4.0 * grey[1:-1, 1:-1]
        flat = lap.ravel()
        mean = flat.mean(dtype=np.float64)
        out[i] = max(0.0, float(flat @ flat) / flat.size - mean * mean)
    return out


def colour_fractions(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each tile's (pen, background) fractions, on every other row and column: two (n,) float64 arrays."""
    floor = ink_floor()
    pen, background = np.empty(len(pixels)), np.empty(len(pixels))
    for i, tile in enumerate(pixels):
        sample = tile[::2, ::2]
        r, g, b = sample[..., 0], sample[..., 1], sample[..., 2]
        key = r.astype(np.uint16) << 8
        key |= g
        ink = b > floor[key]
        lo = np.minimum(np.minimum(r, g), b)
        hi = np.maximum(np.maximum(r, g), b)
        chroma = hi - lo
        bright = (lo >= BACKGROUND_MIN) & (chroma <= BACKGROUND_CHROMA)
        ink |= (hi < BLACK_MAX) & (chroma <= BLACK_CHROMA)
        ink &= ~bright
        pen[i] = np.count_nonzero(ink) / ink.size
        background[i] = np.count_nonzero(bright) / ink.size
    return pen, background


def measure_tiles(pixels: np.ndarray, inside: np.ndarray | None = None) -> TileQuality:
    """Sharpness, pen and background fractions of tiles ``pixels``, (n, h, w, 3) uint8 RGB.

    ``inside`` (n, 2) limits sharpness to each tile's rows and columns on the slide (``inside_slide``);
    padding still counts as background.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3 or min(pixels.shape[1:3]) < 3:
        raise ValueError(f"measure_tiles takes (n, h, w, 3) uint8 tiles of at least 3 × 3 px, got {pixels.dtype} "
                         f"{pixels.shape}")
    pen, background = colour_fractions(pixels)
    return TileQuality(sharpness(pixels, inside), pen, background)


def within_limits(quality: TileQuality, tiling: TilingSpec) -> np.ndarray:
    """Which tiles meet ``tiling``'s quality limits (``min_sharpness``, ``max_pen``, ``max_background``)."""
    return ((np.asarray(quality.sharpness) >= tiling.min_sharpness)
            & (np.asarray(quality.pen_fraction) <= tiling.max_pen)
            & (np.asarray(quality.background_fraction) <= tiling.max_background))


def parse_limits(text: str) -> dict[str, float]:
    """``TilingSpec`` keyword arguments from a ``--min-quality`` value.

    ``default`` sets ``DEFAULT_LIMITS``; ``NAME=VALUE`` pairs, comma-separated, set single limits (the
    others keep every tile) or override the defaults (``default,pen=0.1``).
    """
    form = ("expected 'default' or NAME=VALUE pairs with NAME in sharpness, pen, background, e.g. "
            "sharpness=60,pen=0.05,background=0.9")
    limits: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if item == "default":
            limits.update({QUALITY_OPTIONS[name]: value for name, value in DEFAULT_LIMITS.items()})
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in QUALITY_OPTIONS:
            raise InvalidArgumentError(f"--min-quality {text!r}: {item!r} is not a limit; {form}")
        try:
            number = float(value)
        except ValueError as err:
            raise InvalidArgumentError(f"--min-quality {text!r}: {value.strip()!r} is not a number; {form}") from err
        if not (math.isfinite(number) and number >= 0.0 and (name == "sharpness" or number <= 1.0)):
            bounds = "a finite number >= 0" if name == "sharpness" else "a fraction in [0, 1]"
            raise InvalidArgumentError(f"--min-quality {text!r}: {name} must be {bounds}; {form}")
        limits[QUALITY_OPTIONS[name]] = number
    return limits


def describe_limits(tiling: TilingSpec) -> str:
    """``tiling``'s active quality limits in the ``--min-quality`` form, e.g. ``sharpness=50,pen=0.05``."""
    return ",".join(f"{name}={getattr(tiling, field):g}" for name, field in QUALITY_OPTIONS.items()
                    if getattr(tiling, field) != QUALITY_DEFAULTS[field])
