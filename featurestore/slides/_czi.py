"""Zeiss CZI backend through pylibCZIrw (Zeiss's own libCZI).

µm/px comes from the metadata's ``Scaling/Items/Distance`` values. The CZI format stores
them in metres (ZEN writes 2.2e-07 for 0.22 µm/px); pylibCZIrw's writer documents its
``scale_x`` in µm and stores the number as given, so a value of 1e-3 or more, which no
slide scan has in metres per pixel, is read as µm.

Levels: the pyramid layers the file stores, when it has them; otherwise levels at 4, 16,
64... times coarser that libCZI computes by downscaling. Both are read through libCZI's
scaling accessor (``zoom``), which uses a stored layer when there is one. libCZI takes
level-0 rectangles in the file's own coordinates (the bounding box may not start at 0, 0)
and paints areas no subblock covers (gaps between scenes) in the background colour, which
is set to the caller's fill.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.schemas.errors import SlideError
from featurestore.slides.base import WHITE, ReaderError, SlideReader

_SYNTHETIC_STEP = 4
_SMALLEST_LEVEL = 256
"""Synthetic levels stop before the longer side would drop below this many pixels."""

_RGB_TYPES = ("Bgr24", "Bgr48")


def _float(text: str | None) -> float | None:
    try:
        x = float(text) if text is not None else 0.0
    except ValueError:
        return None
    return x if x > 0 else None


def _metadata(xml: str) -> tuple[tuple[float, float] | None, float | None]:
    """(µm/px, objective magnification) from a CZI's XML metadata."""
    root = ET.fromstring(xml)
    scale = {}
    for distance in root.iterfind(".//Scaling/Items/Distance"):
        value = _float(distance.findtext("Value"))
        if value is not None:
            scale[distance.get("Id")] = value * 1e6 if value < 1e-3 else value
    mpp = (scale["X"], scale["Y"]) if "X" in scale and "Y" in scale else None
    objective = _float(root.findtext(".//Information/Instrument/Objectives/Objective/NominalMagnification"))
    return mpp, objective


class CziReader(SlideReader):
    """A brightfield (RGB) Zeiss CZI read through pylibCZIrw."""

    backend = "pylibczirw"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            from pylibCZIrw.czi import CziReader as Reader
        except ImportError as err:
            raise ReaderError(self.path, self.backend, f"pylibCZIrw is not installed ({err})",
                              "pip install 'featurestore-path[czi]'") from err
        try:
            self._czi: Any = Reader(str(self.path))
        except Exception as err:  # noqa: BLE001 - libCZI raises RuntimeError and its own bound types.
            raise ReaderError(self.path, self.backend, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}",
                              "check the file is a complete CZI (copy it again)") from err
        try:
            self._open()
        except Exception:
            self._czi.close()
            raise

    def _open(self) -> None:
        czi = self._czi
        types = czi.pixel_types
        if len(types) != 1 or next(iter(types.values())) not in _RGB_TYPES:
            raise ReaderError(self.path, self.backend, f"its channels are {types}, not one RGB (brightfield) channel",
                              "export a brightfield RGB image")
        box = czi.total_bounding_rectangle_no_pyramid
        if box.w <= 0 or box.h <= 0:
            raise ReaderError(self.path, self.backend, "it holds no image", "check the file is a complete CZI")
        self._origin = (box.x, box.y)
        factors = self._stored_pyramid()
        if not factors:
            factors, d = [], _SYNTHETIC_STEP
            while max(box.w, box.h) / d >= _SMALLEST_LEVEL:
                factors.append(d)
                d *= _SYNTHETIC_STEP
        self._downsamples = (1.0, *(float(f) for f in factors))
        self._dims = tuple((max(1, math.floor(box.w / d)), max(1, math.floor(box.h / d))) for d in self._downsamples)
        self._mpp, self._objective = _metadata(czi.raw_metadata)
        self._vendor = "czi"

    def _stored_pyramid(self) -> list[int]:
        """Downsample factors of the pyramid layers stored in the file (subblocks smaller than they cover)."""
        factors: set[int] = set()

        def visit(_: int, info: Any) -> bool:
            if info.physicalSize.w > 0:
                factor = round(info.logicalRect.w / info.physicalSize.w)
                if factor > 1:
                    factors.add(factor)
            return True

        self._czi.enumerate_subblocks(visit)
        return sorted(factors)

    def _handle(self) -> Any:
        if self._czi is None:
            raise SlideError(f"{self.path}: slide is closed; open it again with open_slide()")
        return self._czi

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int],
                    *, fill: tuple[int, int, int] = WHITE) -> np.ndarray:
        self._check_read(level, size)
        czi = self._handle()
        d = self._downsamples[level]
        background = tuple(c / 255 for c in fill)

        def window(x: int, y: int, w: int, h: int) -> np.ndarray:
            roi = (self._origin[0] + round(x * d), self._origin[1] + round(y * d), round(w * d), round(h * d))
            try:
                bgr = czi.read(roi=roi, zoom=1 / d, pixel_type="Bgr24", background_pixel=background)
            except Exception as err:  # noqa: BLE001 - a decode failure is the file's, reported as one line.
                raise SlideError(f"{self.path}: pylibczirw failed reading {(w, h)} at {(x, y)} of level {level} "
                                 f"({type(err).__name__}: {err}); the file may be damaged") from err
            # libCZI rounds the zoomed size itself; an off-by-one edge repeats the last row or column.
            bgr = bgr[:h, :w]
            if bgr.shape[:2] != (h, w):
                bgr = np.pad(bgr, ((0, h - bgr.shape[0]), (0, w - bgr.shape[1]), (0, 0)), mode="edge")
            return bgr[..., ::-1]

        return self._read_padded(location, level, size, fill, window)

    def close(self) -> None:
        if self._czi is not None:
            self._czi.close()
            self._czi = None
