"""The index's share of ``fs vacuum``: FAISS files that no index manifest names.

The store's own vacuum knows nothing of indexes; ``fs vacuum`` runs it, then this.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from featurestore.index._errors import StaleIndexError
from featurestore.index._manifest import INDEXES, read_manifest
from featurestore.schemas import ReadOnlyError, StoreVersionError
from featurestore.store import Store


@dataclass(frozen=True)
class IndexVacuumReport:
    files: int
    bytes_freed: int


def vacuum(store: Store, older_than_s: float) -> IndexVacuumReport:
    """Delete the FAISS files older than ``older_than_s`` that their index's manifest does not name.

    A rebuild replaces its index file, and a build that dies leaves its new file unnamed; a reader
    that loaded the previous manifest may still be opening the old file, hence the retention period.
    A directory whose manifest is missing, damaged or newer than this code is left alone: nothing
    then says which file is live (``fs index build --rebuild`` repairs it).
    """
    if store.read_only:
        raise ReadOnlyError(f"{store.root}: store was opened read-only; vacuum deletes files from it")
    cutoff = time.time() - older_than_s
    files = freed = 0
    indexes = store.root / INDEXES
    for directory in sorted(indexes.iterdir()) if indexes.is_dir() else ():
        try:
            manifest = read_manifest(directory)
        except (StaleIndexError, StoreVersionError):
            continue
        if manifest is None:
            continue
        for path in directory.glob("*.faiss"):
            size = None if path.name == manifest.index_file else _remove_if_older(path, cutoff)
            if size is not None:
                files, freed = files + 1, freed + size
    return IndexVacuumReport(files, freed)


def _remove_if_older(path: Path, cutoff: float) -> int | None:
    """Delete ``path`` if last modified before ``cutoff``; its size, or None when kept or already gone."""
    try:
        stat = path.stat()
        if stat.st_mtime >= cutoff:
            return None
        path.unlink()
    except FileNotFoundError:
        return None
    return stat.st_size
