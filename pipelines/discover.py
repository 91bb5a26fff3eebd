"""Find slides on disk and give each a content fingerprint.

A fingerprint hashes the file size, its first and last MiB and 16 evenly spaced
64 KiB blocks. That reads ~3 MiB however large the slide is (hashing a 3 GB SVS
in full takes seconds per slide on network storage) and still tells apart any
two real scans: their tile data differ in every sampled block. A renamed,
moved or copied slide keeps its fingerprint, so it is never extracted twice.

A DICOM WSI is a series: a folder of instance files (one per pyramid level, plus
label and overview). The folder is the slide; its fingerprint combines those of its
DICOM files, whatever they are named. DICOM files are recognised by the ``DICM``
preamble, so exports that name files by UID without an extension are found too.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from featurestore.slides import dicom_files, is_dicom_file

SLIDE_SUFFIXES = frozenset({
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm", ".czi",
    ".png", ".jpg", ".jpeg",
})
"""Everything OpenSlide 4 opens, generic and OME pyramidal TIFF, Zeiss CZI, DICOM (.dcm files of a series)
and plain PNG/JPEG images (which need an assumed µm/px)."""

_EDGE = 1 << 20
_BLOCK = 64 << 10
_BLOCKS = 16
FINGERPRINT_VERSION = "s1"


def _file_fingerprint(path: Path) -> str:
    size = os.path.getsize(path)
    h = hashlib.sha256(f"{FINGERPRINT_VERSION}:{size}:".encode())
    with open(path, "rb") as f:
        if size <= 2 * _EDGE + _BLOCKS * _BLOCK:
            h.update(f.read())
        else:
            h.update(f.read(_EDGE))
            step = (size - 2 * _EDGE) // (_BLOCKS + 1)
            for i in range(1, _BLOCKS + 1):
                f.seek(_EDGE + i * step)
                h.update(f.read(_BLOCK))
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))
    return h.hexdigest()[:32]


def fingerprint(path: Path) -> str:
    """128-bit hex content id of a slide file, or of a DICOM series folder (see module docstring)."""
    if Path(path).is_dir():
        parts = sorted(_file_fingerprint(f) for f in dicom_files(Path(path)))
        return hashlib.sha256(f"{FINGERPRINT_VERSION}:dicom-series:{','.join(parts)}".encode()).hexdigest()[:32]
    return _file_fingerprint(path)


def slide_bytes(path: Path) -> int:
    """Bytes on disk of a slide file, or of the DICOM files of a series folder."""
    path = Path(path)
    return sum(f.stat().st_size for f in dicom_files(path)) if path.is_dir() else path.stat().st_size


@dataclass(frozen=True)
class Found:
    """Slides found under the given paths: unique by content, with the duplicates set aside."""

    slides: dict[str, Path]
    duplicates: list[tuple[Path, Path]]
    missing: list[str]


def _slide_path(path: Path) -> Path | None:
    """The slide a found file belongs to: itself, its series folder for a DICOM file, None for other files.

    DICOM exports often name files by UID (``1.2.840....5``), so any file not named as another format is
    checked for the DICOM preamble.
    """
    suffix = path.suffix.lower()
    if suffix in SLIDE_SUFFIXES and suffix != ".dcm":
        return path
    if is_dicom_file(path):
        return path.parent
    return path if suffix == ".dcm" else None


def find_slides(paths: list[str | Path]) -> Found:
    """Expand files, folders (recursively) and globs into slides, deduplicated by fingerprint.

    A file named explicitly is a slide whatever its name (a DICOM file stands for its series folder);
    files found in folders and globs are slides when their suffix is a slide format's, or when they are
    DICOM by content.
    """
    candidates: list[Path] = []
    missing: list[str] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            candidates += [s for q in sorted(p.rglob("*")) if q.is_file() and (s := _slide_path(q))]
        elif p.is_file():
            candidates.append(p.parent if is_dicom_file(p) else p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(raw), recursive=True))
            found = [s for m in matches if m.is_file() and (s := _slide_path(m))]
            if not found:
                missing.append(str(raw))
            candidates += found
    slides: dict[str, Path] = {}
    duplicates: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    for path in candidates:
        if path in seen:
            continue  # the other files of a DICOM series already found
        seen.add(path)
        fp = fingerprint(path)
        if fp in slides:
            if slides[fp].resolve() != path.resolve():
                duplicates.append((path, slides[fp]))
            continue
        slides[fp] = path
    return Found(slides, duplicates, missing)
