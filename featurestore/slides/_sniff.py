"""Which format a slide is, from its bytes rather than its name.

A file's extension says what someone called it; its first bytes say what it is (a DICOM
file has ``DICM`` after a 128-byte preamble, a CZI starts with the ``ZISRAWFILE`` segment,
an OME-TIFF is a TIFF whose first ImageDescription is OME-XML). MIRAX's ``.mrxs`` is a
JPEG by content, so a JPEG is asked of OpenSlide before it is taken for a plain image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

Format = Literal["dicom", "czi", "ome-tiff", "tiff", "image", "other"]
"""``other``: no magic we know, left to OpenSlide (Hamamatsu VMS, MIRAX, or not a slide at all)."""

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_CZI_MAGIC = b"ZISRAWFILE"


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: ``DICM`` after the 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_dicom_file(p))


def _is_ome(path: Path) -> bool:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.is_ome)
    except (tifffile.TiffFileError, OSError, ValueError):
        return False  # left to the TIFF readers, whose refusal then says what is wrong


def _openslide_vendor(path: Path) -> str | None:
    try:
        import openslide
    except ImportError:
        return None
    return openslide.OpenSlide.detect_format(path)


def detect_format(path: Path) -> Format:
    """The format of the slide at ``path``, from its content; a folder holding DICOM files is a DICOM series."""
    path = Path(path)
    if path.is_dir():
        return "dicom" if dicom_files(path) else "other"
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return "other"
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_CZI_MAGIC):
        return "czi"
    if head[:4] in _TIFF_MAGIC:
        return "ome-tiff" if _is_ome(path) else "tiff"
    if head.startswith(_PNG_MAGIC):
        return "image"
    if head.startswith(_JPEG_MAGIC):
        return "other" if _openslide_vendor(path) else "image"
    return "other"
