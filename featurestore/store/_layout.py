"""Where things live inside a store directory, and the format marker checked on open.

    STORE/
      featurestore.json        format name and version (written once, on create)
      commits/<commit_id>/     one directory per committed transaction
          <table>.parquet      rows for any record table (slides, tiles, bags...) and labels
          emb/<set_id>/        Zarr v3 array: one slide's embeddings (n, dim) or (n, views, dim)
          pix/<tiling_id>/     Zarr v3 array: one slide's tile pixels (n, size, size, 3) uint8
      staging/<commit_id>/     transactions being written; invisible to readers

The genesis commit (``commits/<GENESIS>/``), written by ``create``, holds one empty typed Parquet
file per table, so every table's glob matches from the start and empty tables keep their schema.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from schemas import FORMAT_VERSION, NotAStoreError, StoreVersionError
from schemas._record import utcnow

MARKER = "featurestore.json"
FORMAT_NAME = "featurestore"
COMMITS = "commits"
STAGING = "staging"
GENESIS = "0" * 20 + "-genesis"


def new_commit_id() -> str:
    """Sortable by time (so the latest commit of a slide wins) and unique across processes."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"


def write_marker(root: Path) -> None:
    payload = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "created_at": utcnow().isoformat()}
    tmp = root / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(root / MARKER)


def check_marker(root: Path) -> int:
    """Return the store's format version, refusing non-stores and newer formats with the fix."""
    marker = root / MARKER
    if not marker.is_file():
        raise NotAStoreError(f"{root}: not a feature store (no {MARKER}); create one with `fs init {root}`")
    try:
        meta = json.loads(marker.read_text())
    except json.JSONDecodeError as err:
        raise NotAStoreError(f"{marker}: unreadable store marker ({err.msg}); restore it from a backup") from err
    if meta.get("format") != FORMAT_NAME:
        raise NotAStoreError(f"{marker}: not a feature store marker (format={meta.get('format')!r})")
    version = int(meta.get("format_version", -1))
    if version > FORMAT_VERSION:
        raise StoreVersionError(f"{root}: store format version {version} is newer than this code reads "
                                f"({FORMAT_VERSION}); upgrade with `pip install -U featurestore-path`")
    return version
