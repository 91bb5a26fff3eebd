"""Checkpoints: fold the table state at one version into a few Parquet files per table.

No checkpoint rewrites a whole table: each table lives in *parts* shared between checkpoints.
A checkpoint adds one part per table with the rows committed since the previous one, and two
parts of the same level merge into one of the next level (a binary counter), keeping O(log n)
parts per table while every row is rewritten O(log n) times in all, so a checkpoint costs the
same at 1,000 slides as at 30,000. Merging keeps only each key's latest row (and only the tiles
``slide_tilings`` points at). ``compact`` merges every table into one part. Parts are sorted by
their keys, so a query for a few slides skips most row groups by their statistics.

A checkpoint only reads versions that are already immutable, so it runs while writers commit; two
processes writing the same checkpoint race on one directory rename and the loser discards its copy.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import duckdb

from featurestore.schemas import FORMAT_VERSION
from featurestore.store import _sql
from featurestore.store._commit import fsync_tree
from featurestore.store._layout import (
    CHECKPOINTS,
    COMMITS,
    LAST_CHECKPOINT,
    PARTS,
    STAGING,
    fsync_dir,
    version_name,
    write_json_atomic,
)
from featurestore.store._snapshot import CHECKPOINT_FILE, Checkpoint, Part, State, latest_checkpoint


def _resolved(name: str, files: list[Path], *, legacy: bool) -> str:
    """The rows of ``files`` that can still matter: each key's latest row, the current tiles, all failures.

    The result has the table's current columns, so a part folded from older files is of the current format.
    """
    source = f"({_sql.read_files(name, files, legacy=legacy)})"
    if name == "tiles":
        return (f"SELECT t.* FROM {source} t SEMI JOIN slide_tilings st ON t.slide_id = st.slide_id "
                "AND t.tiling_id = st.tiling_id AND t.commit_id = st.commit_id "
                "ORDER BY t.slide_id, t.tiling_id, t.tile_index")
    keys = _sql.KEYS.get(name) or _sql.GROUPS.get(name) or ("commit_id",)
    return f"{_sql.latest(name, source)} ORDER BY {', '.join(keys)}"


def _copy(con: duckdb.DuckDBPyConnection, select: str, path: Path, row_group: int) -> int:
    con.execute(f"COPY ({select}) TO {_sql.quote(str(path))} (FORMAT parquet, COMPRESSION zstd, "
                f"ROW_GROUP_SIZE {row_group})")
    return path.stat().st_size


ROW_GROUP = {"tiles": 16384}
"""Rows per Parquet row group of a part; parts are sorted by key, so a lookup of a few slides (or a join's
pushed-down filter) decodes only their groups. Tile groups hold about two slides' tiles; other tables hold
one row per slide, and small groups keep their lookups cheap."""


def _write_part(con: duckdb.DuckDBPyConnection, root: Path, table: str, files: list[Path], lo: int, hi: int,
                level: int, *, legacy: bool) -> Part:
    """The rows of ``files`` that still matter as one new part, written under a temporary name then renamed."""
    name = f"{table}-{version_name(lo)}-{version_name(hi)}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = root / PARTS / f".{name}.tmp"
    size = _copy(con, _resolved(table, files, legacy=legacy), tmp, ROW_GROUP.get(table, 2048))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.rename(tmp, root / PARTS / name)
    return Part(f"{PARTS}/{name}", size, lo, hi, level)


def write(state: State, *, compact: bool = False) -> Checkpoint | None:
    """Write the checkpoint of ``state``; None if another process wrote this version first."""
    root = state.root
    if state.checkpoint is not None and state.checkpoint.version == state.version and not (compact or state.legacy):
        return state.checkpoint
    con = _sql.connect(state)
    staging = root / STAGING / f"checkpoint-{version_name(state.version)}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    target = root / CHECKPOINTS / version_name(state.version)
    try:
        (root / PARTS).mkdir(exist_ok=True)
        parts: dict[str, tuple[Part, ...]] = {}
        for name in _sql.table_names():
            table_parts = list(state.checkpoint.parts.get(name, ())) if state.checkpoint else []
            tail = [root / COMMITS / e.commit_id / f"{name}.parquet" for e in state.entries if name in e.tables]
            if state.legacy and (table_parts or tail):
                # Files of a migrated store's older format: fold them all into one part of the current format.
                lo = table_parts[0].lo if table_parts else state.entries[0].version
                level = max((p.level for p in table_parts), default=0) + 1
                table_parts = [_write_part(con, root, name, [root / p.path for p in table_parts] + tail, lo,
                                           state.version, level, legacy=True)]
            elif tail:
                table_parts.append(_write_part(con, root, name, tail, state.entries[0].version, state.version, 0,
                                               legacy=False))
            while len(table_parts) > 1 and (compact or table_parts[-1].level >= table_parts[-2].level):
                a, b = table_parts[-2], table_parts[-1]
                table_parts[-2:] = [_write_part(con, root, name, [root / a.path, root / b.path], a.lo, b.hi,
                                                max(a.level, b.level) + 1, legacy=False)]
            parts[name] = tuple(table_parts)
        fsync_dir(root / PARTS)
        ckpt = Checkpoint(state.version, parts, state.bytes(), FORMAT_VERSION)
        write_json_atomic(staging / CHECKPOINT_FILE, ckpt.to_dict())
        fsync_tree(staging)
        (root / CHECKPOINTS).mkdir(exist_ok=True)
        try:
            os.rename(staging, target)
        except OSError:
            if target.is_dir():
                return None
            raise
        fsync_dir(root / CHECKPOINTS)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        con.close()
    newest = latest_checkpoint(root)
    if newest is None or newest.version <= ckpt.version:
        write_json_atomic(root / CHECKPOINTS / LAST_CHECKPOINT, {"version": ckpt.version})
    return ckpt
