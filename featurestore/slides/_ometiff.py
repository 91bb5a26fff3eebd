"""OME-TIFF backend through tifffile: µm/px from the OME-XML, levels from SubIFDs or series.

OME-XML gives ``PhysicalSizeX/Y`` with ``PhysicalSizeXUnit`` (µm when absent). A pyramid is
stored either as SubIFDs of the full-resolution image (OME-TIFF 6, Bio-Formats and
tifffile write this) or as further images of the same content at lower resolution;
both become levels here. The slide is the largest RGB image; label and macro images
are not levels because their aspect ratio differs. Regions are decoded tile by tile
through tifffile's Zarr view of a level, so a read touches only the tiles it needs.
"""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.schemas.errors import SlideError
from featurestore.slides.base import WHITE, ReaderError, SlideReader, composite

_UM_PER_UNIT = {"m": 1e6, "dm": 1e5, "cm": 1e4, "mm": 1e3, "µm": 1.0, "μm": 1.0, "um": 1.0, "nm": 1e-3,
                "pm": 1e-6, "Å": 1e-4, "in": 25400.0, "mil": 25.4}
"""OME's UnitsLength values that a pixel size can plausibly use (both micro signs occur in the wild)."""


def _rgb_axes(axes: str, shape: tuple[int, ...]) -> str | None:
    """``YXS`` (interleaved) or ``SYX``/``CYX`` (planar) with 3 or 4 samples; None for anything else."""
    if axes == "YXS" and shape[2] in (3, 4):
        return axes
    if axes in ("SYX", "CYX") and shape[0] in (3, 4):
        return axes
    return None


def _ome_pixels(xml: str) -> list[tuple[ET.Element, ET.Element]]:
    """(Image, Pixels) elements of an OME-XML document, namespace-agnostic."""
    root = ET.fromstring(xml)
    found = []
    for image in root.iter():
        if image.tag.rsplit("}", 1)[-1] != "Image":
            continue
        for child in image:
            if child.tag.rsplit("}", 1)[-1] == "Pixels":
                found.append((image, child))
    return found


def _physical_size(pixels: ET.Element, axis: str) -> float | None:
    value = pixels.get(f"PhysicalSize{axis}")
    factor = _UM_PER_UNIT.get(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
    try:
        um = float(value) * factor if value is not None and factor is not None else 0.0
    except ValueError:
        return None
    return um if um > 0 else None


def _objective(xml: str, image: ET.Element) -> float | None:
    """Nominal magnification of the objective the image's ObjectiveSettings refers to."""
    ref = next((c.get("ID") for c in image if c.tag.rsplit("}", 1)[-1] == "ObjectiveSettings"), None)
    for node in ET.fromstring(xml).iter():
        if node.tag.rsplit("}", 1)[-1] == "Objective" and (ref is None or node.get("ID") == ref):
            try:
                power = float(node.get("NominalMagnification", "0"))
            except ValueError:
                return None
            return power if power > 0 else None
    return None


class OmeTiffReader(SlideReader):
    """An RGB OME-TIFF (pyramidal or not) read through tifffile."""

    backend = "tifffile"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._arrays: list[Any] | None = None
        try:
            import tifffile
            import zarr
        except ImportError as err:
            raise ReaderError(self.path, self.backend, f"tifffile or zarr is not installed ({err})",
                              "pip install tifffile zarr") from err
        try:
            self._tif: Any = tifffile.TiffFile(self.path)
        except Exception as err:  # noqa: BLE001 - tifffile raises TiffFileError, ValueError, struct.error...
            raise ReaderError(self.path, self.backend, f"{type(err).__name__}: {err}",
                              "check the file is a complete OME-TIFF (copy it again)") from err
        try:
            self._open(zarr)
        except ReaderError:
            self._tif.close()
            raise
        except Exception as err:  # noqa: BLE001 - a damaged IFD chain or OME-XML surfaces here, in many types.
            self._tif.close()
            raise ReaderError(self.path, self.backend, f"{type(err).__name__}: {err}",
                              "check the file is a complete OME-TIFF (copy it again)") from err
        self._lock = threading.Lock()

    def _open(self, zarr: Any) -> None:
        tif = self._tif
        xml = tif.ome_metadata
        if not xml:
            raise ReaderError(self.path, self.backend, "no OME-XML in its first ImageDescription",
                              "pass --reader auto (a plain TIFF is read by cuCIM or OpenSlide)")
        rgb = [s for s in tif.series if _rgb_axes(s.axes, s.shape)]
        if not rgb:
            found = ", ".join(f"{s.axes} {s.shape}" for s in tif.series)
            raise ReaderError(self.path, self.backend, f"no RGB image among its series ({found})",
                              "export a brightfield RGB image")
        main = max(rgb, key=lambda s: s.shape[s.axes.index("Y")] * s.shape[s.axes.index("X")])
        if main.dtype != np.uint8:
            raise ReaderError(self.path, self.backend, f"its samples are {main.dtype}, not 8-bit",
                              "export an 8-bit RGB image")
        levels = [(main, i) for i in range(len(main.levels))]
        if len(levels) == 1:
            levels += [(s, 0) for s in self._series_levels(main, rgb)]
        self._axes = main.axes
        self._arrays = [zarr.open_array(s.aszarr(level=i), mode="r") for s, i in levels]
        levels = [s.levels[i] for s, i in levels]
        self._dims = tuple((s.shape[s.axes.index("X")], s.shape[s.axes.index("Y")]) for s in levels)
        w0, h0 = self._dims[0]
        self._downsamples = tuple((w0 / w + h0 / h) / 2 for w, h in self._dims)
        self._vendor = "ome-tiff"
        for image, pixels in _ome_pixels(xml):
            if (pixels.get("SizeX"), pixels.get("SizeY")) == (str(w0), str(h0)):
                mx, my = _physical_size(pixels, "X"), _physical_size(pixels, "Y")
                self._mpp = (mx, my) if mx and my else None
                self._objective = _objective(xml, image)
                break

    @staticmethod
    def _series_levels(main: Any, rgb: list[Any]) -> list[Any]:
        """Other RGB series that are the main image at a lower resolution (same aspect ratio), coarsest last."""
        w0, h0 = main.shape[main.axes.index("X")], main.shape[main.axes.index("Y")]
        found = []
        for s in rgb:
            w, h = s.shape[s.axes.index("X")], s.shape[s.axes.index("Y")]
            if s is not main and s.axes == main.axes and w < w0 and abs(h0 * w / w0 - h) <= 1.5:
                found.append(s)
        return sorted(found, key=lambda s: -s.shape[s.axes.index("X")])

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int],
                    *, fill: tuple[int, int, int] = WHITE) -> np.ndarray:
        self._check_read(level, size)
        if self._arrays is None:
            raise SlideError(f"{self.path}: slide is closed; open it again with open_slide()")
        array = self._arrays[level]

        def window(x: int, y: int, w: int, h: int) -> np.ndarray:
            try:
                with self._lock:  # one file handle: tifffile seeks and reads under it
                    if self._axes == "YXS":
                        region = array[y:y + h, x:x + w]
                    else:
                        region = np.moveaxis(array[:, y:y + h, x:x + w], 0, -1)
            except Exception as err:  # noqa: BLE001 - a decode failure is the file's, reported as one line.
                raise SlideError(f"{self.path}: tifffile failed reading {(w, h)} at {(x, y)} of level {level} "
                                 f"({type(err).__name__}: {err}); the file may be damaged") from err
            if region.shape[2] == 4:
                return composite(region, fill)
            return region

        return self._read_padded(location, level, size, fill, window)

    def close(self) -> None:
        if self._arrays is not None:
            self._arrays = None
            self._tif.close()
