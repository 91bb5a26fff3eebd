"""Whole-slide reading, tissue detection and tiling behind one backend-neutral API.

Backends are imported by name only when asked for, so importing this package
never loads cuCIM (see ``_cucim`` for why that matters) or OpenSlide.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from featurestore.schemas.errors import SlideError
from featurestore.slides.base import WHITE, SlideReader, best_level
from featurestore.slides.tiling import SlideGeometry, TileGrid, qc_overlay, read_tiles, tile_grid
from featurestore.slides.tissue import TissueMask, otsu_threshold, thumbnail, tissue_mask

Backend = Literal["auto", "cucim", "openslide"]

__all__ = [
    "WHITE",
    "Backend",
    "SlideGeometry",
    "SlideReader",
    "TileGrid",
    "TissueMask",
    "best_level",
    "open_slide",
    "otsu_threshold",
    "qc_overlay",
    "read_tiles",
    "thumbnail",
    "tile_grid",
    "tissue_mask",
]


def open_slide(path: str | Path, reader: Backend = "auto") -> SlideReader:
    """Open ``path`` with the named backend; ``auto`` tries cuCIM (faster) and falls back to OpenSlide.

    The fallback covers cuCIM being absent or unusable and formats it cannot read
    (MIRAX, NDPI, ...). When both fail, OpenSlide's error is raised.
    """
    if reader in ("auto", "cucim"):
        from featurestore.slides._cucim import CuCIMReader

        try:
            return CuCIMReader(Path(path))
        except SlideError:
            if reader == "cucim":
                raise
    if reader in ("auto", "openslide"):
        from featurestore.slides._openslide import OpenSlideReader

        return OpenSlideReader(Path(path))
    raise SlideError(f"{path}: unknown slide reader {reader!r}; choose 'auto', 'cucim' or 'openslide'")
