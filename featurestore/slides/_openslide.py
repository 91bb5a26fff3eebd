"""OpenSlide backend: the reference reader, for every format OpenSlide knows (DICOM WSI included).

OpenSlide returns transparent pixels outside the slide (and in sparse regions of
some formats); we composite them onto the requested fill so callers never see
alpha or backend-specific padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openslide

from featurestore.schemas.errors import SlideError
from featurestore.slides._sniff import dicom_files
from featurestore.slides.base import WHITE, ReaderError, SlideReader, composite


def _positive_float(value: str | None) -> float | None:
    try:
        x = float(value) if value is not None else 0.0
    except ValueError:
        return None
    return x if x > 0 else None


class OpenSlideReader(SlideReader):
    """A slide read through OpenSlide (thread-safe, so ``read_regions`` may use threads).

    A folder is a DICOM series: OpenSlide opens it from any one of its files and finds the others beside it.
    """

    backend = "openslide"
    reads_folders = True

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        target = self.path
        if self.path.is_dir():
            files = dicom_files(self.path)
            if not files:
                raise ReaderError(self.path, self.backend, "a folder holding no DICOM file",
                                  "pass a slide file, or the folder of one DICOM series")
            target = files[0]
        try:
            self._slide: openslide.OpenSlide | None = openslide.OpenSlide(target)
        except (openslide.OpenSlideError, OSError) as err:
            raise ReaderError(self.path, self.backend, str(err),
                              "convert it to a format OpenSlide supports") from err
        props = self._slide.properties
        mpp_x = _positive_float(props.get(openslide.PROPERTY_NAME_MPP_X))
        mpp_y = _positive_float(props.get(openslide.PROPERTY_NAME_MPP_Y))
        self._mpp = (mpp_x, mpp_y) if mpp_x and mpp_y else None
        self._objective = _positive_float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        self._vendor = props.get(openslide.PROPERTY_NAME_VENDOR) or "unknown"
        self._dims = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self._downsamples = tuple(float(d) for d in self._slide.level_downsamples)

    def _handle(self) -> openslide.OpenSlide:
        if self._slide is None:
            raise SlideError(f"{self.path}: slide is closed; open it again with open_slide()")
        return self._slide

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int],
                    *, fill: tuple[int, int, int] = WHITE) -> np.ndarray:
        self._check_read(level, size)
        slide = self._handle()
        loc, wh = (int(location[0]), int(location[1])), (int(size[0]), int(size[1]))
        try:
            image = slide.read_region(loc, level, wh)
        except openslide.OpenSlideError as err:
            raise SlideError(f"{self.path}: OpenSlide failed reading {size} at {location}, level {level} "
                             f"({err}); the file may be corrupt") from err
        return composite(np.asarray(image), fill)

    def read_regions(self, locations: Sequence[tuple[int, int]], level: int, size: tuple[int, int],
                     *, fill: tuple[int, int, int] = WHITE, num_workers: int = 1) -> np.ndarray:
        """Threads help because OpenSlide decodes with the GIL released."""
        if num_workers <= 1 or len(locations) <= 1:
            return super().read_regions(locations, level, size, fill=fill)
        out = np.empty((len(locations), size[1], size[0], 3), dtype=np.uint8)

        def work(i: int) -> None:
            out[i] = self.read_region(locations[i], level, size, fill=fill)

        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            list(pool.map(work, range(len(locations))))
        return out

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None
