"""Whole-slide reading, tissue detection and tiling behind one backend-neutral API.

Backends are imported by name only when asked for, so importing this package
never loads cuCIM (see ``_cucim`` for why that matters), OpenSlide, wsidicom,
pylibCZIrw or tifffile.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from featurestore.schemas.errors import SlideError
from featurestore.slides._sniff import Format, detect_format, dicom_files, is_dicom_file
from featurestore.slides.base import WHITE, ReaderError, SlideReader, best_level
from featurestore.slides.quality import measure_tiles
from featurestore.slides.tiling import SlideGeometry, TileGrid, qc_overlay, read_tiles, tile_grid
from featurestore.slides.tissue import TissueMask, otsu_threshold, thumbnail, tissue_mask

__all__ = [
    "AUTO",
    "BACKENDS",
    "READERS",
    "WHITE",
    "Format",
    "ReaderError",
    "SlideGeometry",
    "SlideReader",
    "TileGrid",
    "TissueMask",
    "best_level",
    "detect_format",
    "dicom_files",
    "is_dicom_file",
    "measure_tiles",
    "open_slide",
    "otsu_threshold",
    "qc_overlay",
    "read_tiles",
    "thumbnail",
    "tile_grid",
    "tissue_mask",
]


@dataclass(frozen=True)
class BackendEntry:
    """A reader backend: the class that implements it (imported on first use) and the formats it reads."""

    name: str
    target: str
    """``module:Class``."""
    formats: str
    """What it reads, in words (error messages list it)."""

    def load(self) -> type[SlideReader]:
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)


BACKENDS: dict[str, BackendEntry] = {b.name: b for b in (
    BackendEntry("cucim", "featurestore.slides._cucim:CuCIMReader", "Aperio SVS, Philips and generic tiled TIFF"),
    BackendEntry("openslide", "featurestore.slides._openslide:OpenSlideReader",
                 "everything OpenSlide 4 reads, DICOM WSI included"),
    BackendEntry("wsidicom", "featurestore.slides._dicom:WsiDicomReader", "DICOM WSI series"),
    BackendEntry("pylibczirw", "featurestore.slides._czi:CziReader", "Zeiss CZI"),
    BackendEntry("tifffile", "featurestore.slides._ometiff:OmeTiffReader", "OME-TIFF pyramids"),
    BackendEntry("pillow", "featurestore.slides._image:ImageReader", "PNG and JPEG images, with --assume-mpp"),
)}

AUTO: dict[Format, tuple[str, ...]] = {
    "dicom": ("wsidicom", "openslide"),
    "czi": ("pylibczirw",),
    "ome-tiff": ("tifffile",),
    "tiff": ("cucim", "openslide"),
    "image": ("pillow",),
    "other": ("openslide",),
}
"""Backends ``auto`` tries for each detected format, best first; the later ones are fallbacks."""

READERS: tuple[str, ...] = ("auto", *BACKENDS)
"""Every value ``open_slide`` and ``fs extract --reader`` accept."""


def open_slide(path: str | Path, reader: str = "auto") -> SlideReader:
    """Open ``path`` with the named backend; ``auto`` picks by the file's content (see ``AUTO``).

    With ``auto``, a backend that refuses the file hands it to the next one for its format (cuCIM to
    OpenSlide for TIFF, wsidicom to OpenSlide for DICOM); when all refuse, the error names each and why.
    """
    path = Path(path)
    if reader != "auto":
        if reader not in BACKENDS:
            choices = "; ".join(f"{b.name} ({b.formats})" for b in BACKENDS.values())
            raise SlideError(f"{path}: unknown slide reader {reader!r}; choose auto (by content) or one of: {choices}")
        return BACKENDS[reader].load()(path)
    if not path.exists():
        raise SlideError(f"{path}: no such file; check the slide path")
    fmt = detect_format(path)
    refusals: list[SlideError] = []
    for name in AUTO[fmt]:
        try:
            return BACKENDS[name].load()(path)
        except SlideError as err:
            refusals.append(err)
    if len(refusals) == 1:
        raise refusals[0]
    reasons = "; ".join(f"{e.reader}: {e.why}" if isinstance(e, ReaderError) else str(e) for e in refusals)
    raise SlideError(f"{path}: {fmt} content, but no reader opens it ({reasons}); check the file is complete, "
                     f"or convert it to a pyramidal TIFF") from refusals[-1]
