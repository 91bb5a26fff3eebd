"""cuCIM backend: fast TIFF-family reads (Aperio SVS, Philips TIFF, generic tiled TIFF).

Why cuCIM is imported lazily, and only through :func:`import_cuimage`: loading
``libcucim`` runs a static initialiser that calls ``cuFileDriverOpen()``
(GPUDirect Storage). On a machine with a CUDA driver but no working GDS stack,
and typically once ``torch`` has already loaded ``libcufile``, that call can
block forever while cuFile probes the nvidia-fs driver and the PCI topology.
cuCIM has no switch of its own to skip it (its only environment variables are
``CUCIM_CONFIG_PATH``, ``CUCIM_PLUGINS``, ``CUCIM_TRACE`` and ``ENABLE_CUSLIDE2``),
but cuFile reads its configuration from ``$CUFILE_ENV_PATH_JSON`` when the
driver is opened, not when the library is loaded. So before the first import we
point that variable at ``cufile_disabled.json`` (shipped with this package),
which sets ``properties.force_compat_mode`` - all I/O through POSIX, no
nvidia-fs, and, as libcufile logs it, "Skipping building device topology for
compat mode" - and sends cuFile's log to /tmp instead of the working directory.
A value the user set already is left alone. cuCIM reads slides with its own
POSIX reader, so nothing is lost.

Reads match OpenSlide's semantics: level-0 locations, and pixels outside the
slide set to ``fill`` explicitly (cuCIM returns zeros there for single reads and
unspecified bytes in batched reads).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.schemas.errors import SlideError
from featurestore.slides.base import WHITE, ReaderError, SlideReader

CUFILE_CONFIG = Path(__file__).with_name("cufile_disabled.json")
"""cuFile configuration that forces compatibility mode; see the module docstring."""

_BATCH = 32
"""Regions per batch in cuCIM's multi-location reads: big enough to keep its workers busy."""


@contextlib.contextmanager
def _quiet_native_output() -> Iterator[None]:
    """Send what native code prints to /dev/null for a moment.

    Even in compat mode, libcufile prints "dlopen error libcuda.so.1 … cuFile initialization failed"
    straight to the process's stdout/stderr on a machine without a CUDA driver (once torch is loaded),
    when cuCIM is imported and when it opens a file. Python-level errors still propagate.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def import_cuimage() -> Any:
    """``cucim.clara.CuImage``, imported only after cuFile has been told not to probe for GDS."""
    os.environ.setdefault("CUFILE_ENV_PATH_JSON", str(CUFILE_CONFIG))
    with _quiet_native_output():
        from cucim.clara import CuImage

    return CuImage


def _float_or_none(value: object) -> float | None:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if x > 0 else None


class CuCIMReader(SlideReader):
    """A slide read through cuCIM on the CPU; ``read_regions`` uses cuCIM's batched, multi-threaded reader."""

    backend = "cucim"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            cuimage = import_cuimage()
        except (ImportError, OSError) as err:
            raise ReaderError(self.path, self.backend, f"cuCIM is not usable here: {err}",
                              "install cucim-cu13 or pass reader='openslide'") from err
        try:
            with _quiet_native_output():
                self._img: Any = cuimage(str(self.path))
        except (ValueError, RuntimeError) as err:
            raise ReaderError(self.path, self.backend, str(err), "pass reader='openslide'") from err
        if self._img.dims != "YXC" or self._img.shape[-1] != 3:
            dims, shape = self._img.dims, self._img.shape
            self._img.close()
            raise ReaderError(self.path, self.backend, f"it decodes as {dims} {shape}, not RGB",
                              "pass reader='openslide'")
        res = self._img.resolutions
        self._dims = tuple((int(w), int(h)) for w, h in res["level_dimensions"])
        self._downsamples = tuple(float(d) for d in res["level_downsamples"])
        meta = self._img.metadata
        self._vendor = next((v for v in ("aperio", "philips") if v in meta),
                            "generic-tiff" if "tiff" in meta else "unknown")
        aperio = meta.get("aperio", {})
        self._objective = _float_or_none(aperio.get("AppMag"))
        self._mpp = self._read_mpp(aperio)

    def _read_mpp(self, aperio: dict[str, Any]) -> tuple[float, float] | None:
        """Aperio's ``MPP`` first (cuCIM leaves spacing at 1 with no unit for SVS), else TIFF resolution.

        cuCIM converts TIFF resolution tags to micrometre spacing in ``dims`` order (Y, X, C).
        """
        mpp = _float_or_none(aperio.get("MPP"))
        if mpp is not None:
            return (mpp, mpp)
        spacing, units = self._img.spacing(), self._img.spacing_units()
        ix, iy = self._img.dims.index("X"), self._img.dims.index("Y")
        if units[ix] == units[iy] == "micrometer":
            mx, my = _float_or_none(spacing[ix]), _float_or_none(spacing[iy])
            if mx is not None and my is not None:
                return (mx, my)
        return None

    def _handle(self) -> Any:
        if self._img is None:
            raise SlideError(f"{self.path}: slide is closed; open it again with open_slide()")
        return self._img

    def _pad(self, region: np.ndarray, location: tuple[int, int], level: int,
             fill: tuple[int, int, int]) -> None:
        """Set the pixels of ``region`` that lie outside the slide to ``fill``, in place.

        cuCIM maps a level-0 location to ``int(x / downsample)`` at the level (truncating toward
        zero, measured on cuCIM 26.10), so the in-slide window is computed the same way.
        """
        d = self._downsamples[level]
        width, height = self._dims[level]
        lx, ly = int(location[0] / d), int(location[1] / d)
        h, w = region.shape[:2]
        c0, c1 = min(max(-lx, 0), w), min(max(width - lx, 0), w)
        r0, r1 = min(max(-ly, 0), h), min(max(height - ly, 0), h)
        if (c0, r0, c1, r1) == (0, 0, w, h):
            return
        region[:r0] = fill
        region[r1:] = fill
        region[:, :c0] = fill
        region[:, c1:] = fill

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int],
                    *, fill: tuple[int, int, int] = WHITE) -> np.ndarray:
        self._check_read(level, size)
        loc = (int(location[0]), int(location[1]))
        try:
            region = self._handle().read_region(loc, (int(size[0]), int(size[1])), level)
        except (ValueError, RuntimeError) as err:
            raise SlideError(f"{self.path}: cuCIM failed reading {size} at {location}, level {level} "
                             f"({err}); the file may be corrupt, try reader='openslide'") from err
        out = np.array(region, dtype=np.uint8)
        self._pad(out, loc, level, fill)
        return out

    def read_regions(self, locations: Sequence[tuple[int, int]], level: int, size: tuple[int, int],
                     *, fill: tuple[int, int, int] = WHITE, num_workers: int = 1) -> np.ndarray:
        """One cuCIM multi-location read; each batch is copied out at once because the iterator reuses it."""
        if len(locations) <= 1:
            return super().read_regions(locations, level, size, fill=fill)
        self._check_read(level, size)
        w, h = int(size[0]), int(size[1])
        locs = [(int(x), int(y)) for x, y in locations]
        out = np.empty((len(locs), h, w, 3), dtype=np.uint8)
        try:
            batches = self._handle().read_region(locs, (w, h), level, num_workers=max(1, num_workers),
                                                 batch_size=min(len(locs), _BATCH))
            i = 0
            for batch in batches:
                arr = np.asarray(batch).reshape(-1, h, w, 3)
                out[i:i + len(arr)] = arr
                i += len(arr)
        except (ValueError, RuntimeError) as err:
            raise SlideError(f"{self.path}: cuCIM failed a batched read of {len(locs)} regions at level "
                             f"{level} ({err}); the file may be corrupt, try reader='openslide'") from err
        for region, loc in zip(out, locs, strict=True):
            self._pad(region, loc, level, fill)
        return out

    def close(self) -> None:
        if self._img is not None:
            self._img.close()
            self._img = None
