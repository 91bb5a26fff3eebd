"""The slide-reader interface: one small seam with every backend behind it.

Coordinates are always level-0 pixels (as in OpenSlide), sizes are in pixels
of the level being read, and regions that fall outside the slide are padded
with an explicit fill colour rather than whatever the backend happens to return.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

import numpy as np

from featurestore.schemas.errors import SlideError

WHITE: tuple[int, int, int] = (255, 255, 255)


class ReaderError(SlideError):
    """A backend refused a file: the message names the backend and why, so a batch's failure table says which
    reader refused what (``reader`` and ``why`` let ``open_slide`` combine the refusals of a fallback chain)."""

    def __init__(self, path: Path, reader: str, why: str, fix: str) -> None:
        super().__init__(f"{path}: {reader} cannot read it ({why}); {fix}")
        self.reader = reader
        self.why = why


def composite(rgba: np.ndarray, fill: tuple[int, int, int]) -> np.ndarray:
    """Straight-alpha RGBA (h, w, 4) onto opaque ``fill``: alpha 0 gives ``fill`` exactly, 255 the pixel."""
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)
    rgb = rgba[..., :3].astype(np.uint16)
    bg = np.asarray(fill, dtype=np.uint16)
    return ((rgb * a + bg * (255 - a) + 127) // 255).astype(np.uint8)


def best_level(level_downsamples: Sequence[float], downsample: float) -> int:
    """The coarsest level whose downsample is at or below ``downsample``; a function so tiling can plan
    reads from a slide's geometry alone, without an open reader."""
    best = 0
    for i, d in enumerate(level_downsamples):
        if d <= downsample * (1 + 1e-6):
            best = i
    return best


class SlideReader(ABC):
    """A whole-slide image opened by one backend; use as a context manager.

    Backends fill ``_dims``, ``_downsamples``, ``_mpp``, ``_objective`` and ``_vendor`` when they open
    the file, and implement the reads.
    """

    backend: ClassVar[str]
    reads_folders: ClassVar[bool] = False
    """Whether a folder can be one slide (a DICOM series is a folder of instance files)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not (self.path.is_file() or (self.reads_folders and self.path.is_dir())):
            raise SlideError(f"{self.path}: no such file; check the slide path")
        self._dims: tuple[tuple[int, int], ...] = ()
        self._downsamples: tuple[float, ...] = ()
        self._mpp: tuple[float, float] | None = None
        self._objective: float | None = None
        self._vendor = "unknown"

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of every pyramid level, level 0 first."""
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample factor of every level relative to level 0."""
        return self._downsamples

    @property
    def mpp(self) -> tuple[float, float] | None:
        """Level-0 µm/px (x, y) from the file's metadata, or None when the file has none."""
        return self._mpp

    @property
    def objective_power(self) -> float | None:
        """Scanner objective magnification, when the file records it."""
        return self._objective

    @property
    def vendor(self) -> str:
        """Format/vendor name as OpenSlide reports it (``aperio``, ``generic-tiff``...)."""
        return self._vendor

    @abstractmethod
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int],
                    *, fill: tuple[int, int, int] = WHITE) -> np.ndarray:
        """RGB uint8 array (h, w, 3) of ``size`` at ``level`` whose top-left is ``location`` at level 0.

        Pixels outside the slide are ``fill``; transparent pixels are composited on ``fill``.
        """

    def read_regions(self, locations: Sequence[tuple[int, int]], level: int, size: tuple[int, int],
                     *, fill: tuple[int, int, int] = WHITE, num_workers: int = 1) -> np.ndarray:
        """Several same-sized regions as one (n, h, w, 3) array; backends may batch this."""
        out = np.empty((len(locations), size[1], size[0], 3), dtype=np.uint8)
        for i, loc in enumerate(locations):
            out[i] = self.read_region(loc, level, size, fill=fill)
        return out

    @abstractmethod
    def close(self) -> None:
        """Release the file handle."""

    def _read_padded(self, location: tuple[int, int], level: int, size: tuple[int, int],
                     fill: tuple[int, int, int], read_window: Callable[[int, int, int, int], np.ndarray]
                     ) -> np.ndarray:
        """A region whose in-slide part comes from ``read_window(x, y, w, h)`` (level pixels, inside the level)
        and whose rest is ``fill``, for backends that refuse reads past the edge.

        A level-0 location maps to ``floor(x / downsample)`` at the level.
        """
        self._check_read(level, size)
        d = self._downsamples[level]
        width, height = self._dims[level]
        w, h = int(size[0]), int(size[1])
        lx, ly = math.floor(location[0] / d), math.floor(location[1] / d)
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, width), min(ly + h, height)
        if (x0, y0, x1, y1) == (lx, ly, lx + w, ly + h):
            return np.require(read_window(lx, ly, w, h), np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])
        out = np.empty((h, w, 3), dtype=np.uint8)
        out[:] = fill
        if x0 < x1 and y0 < y1:
            out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = read_window(x0, y0, x1 - x0, y1 - y0)
        return out

    def _check_read(self, level: int, size: tuple[int, int]) -> None:
        """Reject bad reads here, so both backends fail alike instead of each in its own way."""
        if not 0 <= level < self.level_count:
            raise SlideError(f"{self.path}: level {level} does not exist; choose 0..{self.level_count - 1}")
        if size[0] <= 0 or size[1] <= 0:
            raise SlideError(f"{self.path}: region size {size} is empty; pass a positive (width, height)")

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample is at or below ``downsample`` (so we never upsample)."""
        return best_level(self.level_downsamples, downsample)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
