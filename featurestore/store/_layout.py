"""Where things live inside a store directory, and the format marker checked on open.

    STORE/
      featurestore.json        format name and version
      log/<version>.json       the ordered commit log: entry v publishes one commit (or drops some)
      commits/<commit_id>/     one directory per transaction; visible only once a log entry names it
          _manifest.json       every file of the commit with its size and sha256
          <table>.parquet      rows for any record table (slides, tiles, bags...) and labels
          emb/<set_id>/        Zarr v3 array: one slide's embeddings (n, dim) or (n, views, dim)
          pix/<tiling_id>/     Zarr v3 array: one slide's tile pixels (n, size, size, 3) uint8
      checkpoints/<version>/   every table folded at that version (derived; safe to delete)
      checkpoints/_last.json   hint: the newest checkpoint's version
      parts/                   tile-table parts the checkpoints share
      staging/<commit_id>/     transactions and checkpoints being written; invisible to readers

The genesis commit (log entry 0, ``commits/<GENESIS>/``), written by ``create``, holds one empty
typed Parquet file per table, so every table has a schema from the start.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from featurestore.schemas import FORMAT_VERSION, NotAStoreError, StoreVersionError, utcnow

MARKER = "featurestore.json"
FORMAT_NAME = "featurestore"
COMMITS = "commits"
STAGING = "staging"
LOG = "log"
CHECKPOINTS = "checkpoints"
PARTS = "parts"
LAST_CHECKPOINT = "_last.json"
MANIFEST = "_manifest.json"
GENESIS = "0" * 20 + "-genesis"


def new_commit_id() -> str:
    """Sortable by time (so the latest commit of a slide wins) and unique across processes."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"


def version_name(version: int) -> str:
    return f"{version:020d}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write to a unique temporary name, flush, rename over ``path``: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(payload, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_marker(root: Path, version: int = FORMAT_VERSION, *, migrated_from: int | None = None) -> None:
    """The format marker; a migrated store records the format its older files were written in."""
    meta = {"format": FORMAT_NAME, "format_version": version, "created_at": utcnow().isoformat()}
    if migrated_from is not None:
        meta["migrated_from"] = migrated_from
    write_json_atomic(root / MARKER, meta)


def migrated_from(root: Path) -> int | None:
    """The format a migrated store was upgraded from (its older files are of that format), else None."""
    value = json.loads((root / MARKER).read_text()).get("migrated_from")
    return value if type(value) is int else None


def read_marker_version(root: Path) -> int:
    """The store's format version, refusing non-stores and malformed markers with the fix."""
    marker = root / MARKER
    if root.exists() and not root.is_dir():
        raise NotAStoreError(f"{root}: is a file, not a store directory; pass the store's directory")
    if not marker.is_file():
        raise NotAStoreError(f"{root}: not a feature store (no {MARKER}); create one with `fs init {root}`")
    try:
        meta = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise NotAStoreError(f"{marker}: unreadable store marker ({err}); restore it from a backup") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise NotAStoreError(f"{marker}: not a feature store marker; restore it from a backup")
    version = meta.get("format_version")
    if type(version) is not int or version < 1:
        raise NotAStoreError(f"{marker}: format_version {version!r} is not a positive whole number; "
                             "restore the marker from a backup")
    return version


def check_marker(root: Path) -> int:
    """Return the store's format version if this code reads it; refuse older and newer ones with the fix."""
    version = read_marker_version(root)
    if version > FORMAT_VERSION:
        raise StoreVersionError(f"{root}: store format version {version} is newer than this code reads "
                                f"({FORMAT_VERSION}); upgrade with `pip install -U featurestore-path`")
    if version < FORMAT_VERSION:
        raise StoreVersionError(f"{root}: store format version {version} predates this code ({FORMAT_VERSION}); "
                                f"upgrade it in place with `fs migrate {root}`")
    return version
