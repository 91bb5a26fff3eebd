"""Per-commit manifests: every file a commit wrote, with its size and sha256.

Zarr reads a missing chunk as the array's fill value and a truncated shard as missing chunks, so a
damaged bag would read as zeros. Reads therefore check the files they are about to use against the
manifest (a ``stat`` each: presence and size); ``fs verify --deep`` also re-hashes them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from featurestore.store._layout import MANIFEST

_BLOCK = 1 << 20


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def build(directory: Path) -> dict[str, tuple[int, str]]:
    """``relative path -> (size, sha256)`` of every file under ``directory`` except the manifest."""
    files = {}
    for dirpath, _, names in os.walk(directory):
        for name in names:
            path = Path(dirpath) / name
            rel = path.relative_to(directory).as_posix()
            if rel != MANIFEST:
                files[rel] = (path.stat().st_size, sha256(path))
    return dict(sorted(files.items()))


def table_sizes(files: dict[str, tuple[int, str]]) -> dict[str, int]:
    """``table name -> bytes`` of the commit's Parquet tables (its top-level ``<table>.parquet`` files)."""
    return {rel.removesuffix(".parquet"): size for rel, (size, _) in files.items()
            if rel.endswith(".parquet") and "/" not in rel}


def write(directory: Path, commit_id: str, files: dict[str, tuple[int, str]]) -> None:
    payload = {"commit_id": commit_id, "files": {k: [size, digest] for k, (size, digest) in files.items()}}
    (directory / MANIFEST).write_text(json.dumps(payload, indent=0) + "\n")


def read(directory: Path) -> dict[str, tuple[int, str]] | None:
    """The manifest of a commit directory, or None when it is missing or unreadable."""
    try:
        payload = json.loads((directory / MANIFEST).read_bytes())
        return {k: (int(v[0]), str(v[1])) for k, v in payload["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


@dataclass(frozen=True)
class Damage:
    """One file that is not what its manifest says."""

    path: Path
    problem: str


def size_damage(path: Path, size: int) -> Damage | None:
    """A missing file or one of another size than recorded (one ``stat``), else None."""
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        return Damage(path, "missing")
    return None if actual == size else Damage(path, f"{actual} bytes, the commit wrote {size}")


def check(directory: Path, files: dict[str, tuple[int, str]], prefix: str = "", *, deep: bool = False) -> list[Damage]:
    """Files under ``prefix`` that are missing, of the wrong size or (``deep``) of the wrong content."""
    damage = []
    for rel, (size, digest) in files.items():
        if not rel.startswith(prefix):
            continue
        found = size_damage(directory / rel, size)
        if found is None and deep and sha256(directory / rel) != digest:
            found = Damage(directory / rel, "checksum differs from the one recorded at commit")
        if found is not None:
            damage.append(found)
    return damage
