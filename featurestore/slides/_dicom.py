"""DICOM WSI backend through wsidicom: a series (a folder of instance files) is one slide.

wsidicom reads every transfer syntax the DICOM WSI standard uses and the metadata
OpenSlide does not expose (the objective lens power). Given one file, the reader opens
the DICOM files beside it, as OpenSlide does; non-DICOM files in the folder are skipped.
wsidicom refuses reads past a level's edge, so regions are read inside the level and
padded here. Level numbers are positions in the pyramid (0 = base), as for every backend;
wsidicom's own level numbers (log2 of the scale) are mapped here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from featurestore.schemas.errors import SlideError
from featurestore.slides._sniff import dicom_files
from featurestore.slides.base import WHITE, ReaderError, SlideReader


def _objective_power(wsi: Any) -> float | None:
    """The objective lens power of the slide's first optical path, when the file records one."""
    try:
        paths = wsi.metadata.pyramid.optical_paths
    except Exception:  # noqa: BLE001 - optional metadata that wsidicom may fail to parse is not a reason to refuse.
        return None
    for path in paths:
        power = getattr(getattr(path, "objective", None), "objective_power", None)
        if power:
            return float(power)
    return None


class WsiDicomReader(SlideReader):
    """A DICOM WSI series read through wsidicom."""

    backend = "wsidicom"
    reads_folders = True

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        folder = self.path if self.path.is_dir() else self.path.parent
        files = dicom_files(folder)
        if not files:
            raise ReaderError(self.path, self.backend, "no DICOM file (no DICM preamble)",
                              "pass a DICOM WSI file or the folder of its series")
        try:
            from wsidicom import WsiDicom
        except ImportError as err:
            raise ReaderError(self.path, self.backend, f"wsidicom is not installed ({err})",
                              "pip install wsidicom, or pass --reader openslide") from err
        try:
            self._wsi: Any = WsiDicom.open(files)
            levels = list(self._wsi.levels)
        except Exception as err:  # noqa: BLE001 - wsidicom raises many types (pydicom, its own, KeyError...).
            raise ReaderError(self.path, self.backend, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}",
                              "check the series is complete, or pass --reader openslide") from err
        if not levels:
            self._wsi.close()
            raise ReaderError(self.path, self.backend, "no pyramid level (VOLUME instance) in the series",
                              "pass the folder of a slide's image series")
        self._levels = [lv.level for lv in levels]
        w0, h0 = levels[0].size.width, levels[0].size.height
        self._dims = tuple((lv.size.width, lv.size.height) for lv in levels)
        # As OpenSlide computes it, so both DICOM backends plan the same reads.
        self._downsamples = tuple((w0 / w + h0 / h) / 2 for w, h in self._dims)
        mpp = levels[0].mpp if levels[0].pixel_spacing is not None else None
        self._mpp = (float(mpp.width), float(mpp.height)) if mpp is not None and mpp.width > 0 else None
        self._objective = _objective_power(self._wsi)
        self._vendor = "dicom"

    def _handle(self) -> Any:
        if self._wsi is None:
            raise SlideError(f"{self.path}: slide is closed; open it again with open_slide()")
        return self._wsi

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int],
                    *, fill: tuple[int, int, int] = WHITE) -> np.ndarray:
        self._check_read(level, size)
        wsi = self._handle()

        def window(x: int, y: int, w: int, h: int) -> np.ndarray:
            try:
                region = wsi.read_region((x, y), self._levels[level], (w, h), as_array=True)
            except Exception as err:  # noqa: BLE001 - any decode failure is the file's, reported as one line.
                raise SlideError(f"{self.path}: wsidicom failed reading {(w, h)} at {(x, y)} of level {level} "
                                 f"({type(err).__name__}: {err}); the series may be damaged") from err
            return np.repeat(region[..., None], 3, axis=2) if region.ndim == 2 else region[..., :3]

        return self._read_padded(location, level, size, fill, window)

    def close(self) -> None:
        if self._wsi is not None:
            self._wsi.close()
            self._wsi = None
