"""Find slides on disk and give each a content fingerprint.

A fingerprint hashes the file size, its first and last MiB and 16 evenly spaced
64 KiB blocks. That reads ~3 MiB however large the slide is (hashing a 3 GB SVS
in full takes seconds per slide on network storage) and still tells apart any
two real scans: their tile data differ in every sampled block. A renamed,
moved or copied slide keeps its fingerprint, so it is never extracted twice.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

SLIDE_SUFFIXES = frozenset({
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm",
})
"""Everything OpenSlide 4 opens, plus generic pyramidal TIFF (DICOM as .dcm files of a series)."""

_EDGE = 1 << 20
_BLOCK = 64 << 10
_BLOCKS = 16
FINGERPRINT_VERSION = "s1"


def fingerprint(path: Path) -> str:
    """128-bit hex content id of a slide file (see module docstring)."""
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


@dataclass(frozen=True)
class Found:
    """Slides found under the given paths: unique by content, with the duplicates set aside."""

    slides: dict[str, Path]
    duplicates: list[tuple[Path, Path]]
    missing: list[str]


def find_slides(paths: list[str | Path]) -> Found:
    """Expand files, folders (recursively) and globs into slide files, deduplicated by fingerprint.

    DICOM series are folders of .dcm files; OpenSlide opens the series from any one file, so only the
    first file of each folder is kept.
    """
    candidates: list[Path] = []
    missing: list[str] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            candidates += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in SLIDE_SUFFIXES)
        elif p.is_file():
            candidates.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(raw), recursive=True))
            files = [m for m in matches if m.is_file() and m.suffix.lower() in SLIDE_SUFFIXES]
            if not files:
                missing.append(str(raw))
            candidates += files
    slides: dict[str, Path] = {}
    duplicates: list[tuple[Path, Path]] = []
    dicom_dirs: set[Path] = set()
    for path in candidates:
        if path.suffix.lower() == ".dcm":
            if path.parent in dicom_dirs:
                continue
            dicom_dirs.add(path.parent)
        fp = fingerprint(path)
        if fp in slides:
            if slides[fp].resolve() != path.resolve():
                duplicates.append((path, slides[fp]))
            continue
        slides[fp] = path
    return Found(slides, duplicates, missing)
