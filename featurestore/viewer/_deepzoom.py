"""Deep Zoom tiles of a slide: OpenSlide's DeepZoomGenerator, or the same layout over any ``SlideReader``.

OpenSlide reads most slides (SVS, generic and pyramidal TIFF, DICOM, NDPI, MRXS...). For what only our
other backends read (CZI, OME-TIFF, PNG/JPEG), ``ReaderDeepZoom`` cuts the same Deep Zoom pyramid from
``SlideReader.read_region`` at the finest level at or below each zoom's downsample. Both keep the full
level-0 extent (no bounds cropping), so overlays drawn over the whole slide line up at viewport width 1.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

from PIL import Image

from featurestore.schemas import NotFoundError, SlideError
from featurestore.slides import SlideReader, open_slide

TILE = 254
OVERLAP = 1
OPEN_SLIDES = 16
"""Open slide handles kept for the pyramids being browsed; the oldest is dropped past this."""


class SlideFileGone(SlideError):
    """A slide is in the store but its file is not where the store recorded it (moved, deleted, unmounted)."""


class DeepZoom(Protocol):
    level_count: int

    def dzi(self) -> str: ...

    def tile(self, level: int, col: int, row: int) -> Image.Image: ...

    def close(self) -> None: ...


class OpenSlideDeepZoom:
    """OpenSlide's generator; OpenSlide handles are safe to read from several threads."""

    def __init__(self, path: Path) -> None:
        import openslide
        from openslide.deepzoom import DeepZoomGenerator

        self._slide = openslide.OpenSlide(path)
        self._dz = DeepZoomGenerator(self._slide, tile_size=TILE, overlap=OVERLAP, limit_bounds=False)
        self.level_count = self._dz.level_count

    def dzi(self) -> str:
        return self._dz.get_dzi("jpeg")

    def tile(self, level: int, col: int, row: int) -> Image.Image:
        _check(self._dz.level_tiles, level, col, row)
        return self._dz.get_tile(level, (col, row)).convert("RGB")

    def close(self) -> None:
        self._slide.close()


class ReaderDeepZoom:
    """The Deep Zoom layout over a ``SlideReader`` (one read at a time: not every backend is thread-safe)."""

    def __init__(self, reader: SlideReader) -> None:
        self._reader = reader
        self._lock = threading.Lock()
        width, height = reader.dimensions
        self.level_count = math.ceil(math.log2(max(width, height))) + 1
        self._dims = [(max(1, math.ceil(width / 2 ** (self.level_count - 1 - z))),
                       max(1, math.ceil(height / 2 ** (self.level_count - 1 - z)))) for z in range(self.level_count)]

    def dzi(self) -> str:
        width, height = self._reader.dimensions
        return ('<?xml version="1.0" encoding="UTF-8"?>\n'
                f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="jpeg" Overlap="{OVERLAP}" '
                f'TileSize="{TILE}"><Size Height="{height}" Width="{width}"/></Image>')

    def tile(self, level: int, col: int, row: int) -> Image.Image:
        _check(tuple((math.ceil(w / TILE), math.ceil(h / TILE)) for w, h in self._dims), level, col, row)
        width, height = self._dims[level]
        scale = 2 ** (self.level_count - 1 - level)
        x0, y0 = max(0, col * TILE - OVERLAP), max(0, row * TILE - OVERLAP)
        x1, y1 = min(width, (col + 1) * TILE + OVERLAP), min(height, (row + 1) * TILE + OVERLAP)
        source = self._reader.best_level_for_downsample(scale)
        ds = self._reader.level_downsamples[source]
        size = (max(1, math.ceil((x1 - x0) * scale / ds)), max(1, math.ceil((y1 - y0) * scale / ds)))
        with self._lock:
            pixels = self._reader.read_region((x0 * scale, y0 * scale), source, size)
        return Image.fromarray(pixels).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)

    def close(self) -> None:
        self._reader.close()


def _check(level_tiles: tuple[tuple[int, int], ...], level: int, col: int, row: int) -> None:
    if not 0 <= level < len(level_tiles):
        raise NotFoundError(f"deep zoom level {level} does not exist; levels are 0..{len(level_tiles) - 1}")
    cols, rows = level_tiles[level]
    if not (0 <= col < cols and 0 <= row < rows):
        raise NotFoundError(f"deep zoom tile {col}_{row} is outside level {level} ({cols} x {rows} tiles)")


def open_deepzoom(path: Path) -> DeepZoom:
    """OpenSlide's generator when OpenSlide reads the file, else one over our reader for its format."""
    if not path.exists():
        raise SlideFileGone(f"{path}: the slide file is gone (moved or deleted); its tiles and embeddings are still "
                            "in the store, and the pixels come back when the file is restored at this path")
    import openslide

    try:
        return OpenSlideDeepZoom(path)
    except (openslide.OpenSlideError, OSError):
        return ReaderDeepZoom(open_slide(path))


def jpeg(image: Image.Image, quality: int = 80) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class DeepZoomCache:
    """Open pyramids by slide id, least recently used closed first."""

    def __init__(self, size: int = OPEN_SLIDES) -> None:
        self._open: OrderedDict[str, DeepZoom] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, slide_id: str, path: Path) -> DeepZoom:
        with self._lock:
            if not path.exists():
                # An open handle would keep serving a deleted file; the page should say it is gone instead.
                self._open.pop(slide_id, None)
            found = self._open.get(slide_id)
            if found is not None:
                self._open.move_to_end(slide_id)
                return found
            dz = open_deepzoom(path)
            self._open[slide_id] = dz
            if len(self._open) > self._size:
                # Dropped, not closed: a request may still be reading it; the handle closes when collected.
                self._open.popitem(last=False)
            return dz

    def close(self) -> None:
        with self._lock:
            for dz in self._open.values():
                dz.close()
            self._open.clear()
