"""Checkpoints: fold the table state at one version into a few Parquet files.

Small tables (one row per slide, set, run...) are rewritten whole at every checkpoint. The tile
table is too big for that, so it lives in *parts* shared between checkpoints: each checkpoint
adds one part with the tiles committed since the previous one, and two parts of the same level
merge into one of the next level (a binary counter), keeping O(log n) parts while every tile is
rewritten O(log n) times in all. ``compact`` merges every part into one. Parts are sorted by
slide, so a query for a few slides skips most row groups by their statistics.

A checkpoint only reads versions that are already immutable, so it runs while writers commit; two
processes writing the same checkpoint race on one directory rename and the loser discards its copy.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import duckdb

from featurestore.store import _sql
from featurestore.store._commit import fsync_tree
from featurestore.store._layout import (
    CHECKPOINTS,
    LAST_CHECKPOINT,
    PARTS,
    STAGING,
    fsync_dir,
    version_name,
    write_json_atomic,
)
from featurestore.store._snapshot import CHECKPOINT_FILE, Checkpoint, State, TilePart, latest_checkpoint

CURRENT_TILES = ("SELECT t.* FROM read_parquet([{files}], union_by_name=true) t SEMI JOIN slide_tilings st "
                 "ON t.slide_id = st.slide_id AND t.tiling_id = st.tiling_id AND t.commit_id = st.commit_id "
                 "ORDER BY t.slide_id, t.tiling_id, t.tile_index")


def _copy(con: duckdb.DuckDBPyConnection, select: str, path: Path) -> int:
    con.execute(f"COPY ({select}) TO {_sql.quote(str(path))} (FORMAT parquet, COMPRESSION zstd, "
                "ROW_GROUP_SIZE 100000)")
    return path.stat().st_size


def _write_part(con: duckdb.DuckDBPyConnection, root: Path, files: list[Path], lo: int, hi: int,
                level: int) -> TilePart:
    """Current tiles of ``files`` as one new part, written under a temporary name then renamed."""
    (root / PARTS).mkdir(exist_ok=True)
    name = f"tiles-{version_name(lo)}-{version_name(hi)}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = root / PARTS / f".{name}.tmp"
    listed = ", ".join(_sql.quote(str(f)) for f in files)
    size = _copy(con, CURRENT_TILES.format(files=listed), tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.rename(tmp, root / PARTS / name)
    return TilePart(f"{PARTS}/{name}", size, lo, hi, level)


def write(state: State, *, compact: bool = False) -> Checkpoint | None:
    """Write the checkpoint of ``state``; None if another process wrote this version first."""
    root = state.root
    if state.checkpoint is not None and state.checkpoint.version == state.version and not compact:
        return state.checkpoint
    con = _sql.connect(state)
    staging = root / STAGING / f"checkpoint-{version_name(state.version)}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    target = root / CHECKPOINTS / version_name(state.version)
    try:
        tables = {}
        for name in _sql.table_names():
            if name == "tiles":
                continue
            source = name if name in _sql.KEYS else f"{_sql.RAW}.{name}"
            size = _copy(con, f"SELECT * FROM {source}", staging / f"{name}.parquet")
            tables[name] = (f"{CHECKPOINTS}/{target.name}/{name}.parquet", size)
        parts = list(state.checkpoint.tile_parts) if state.checkpoint else []
        tail = [root / "commits" / e.commit_id / "tiles.parquet" for e in state.entries if "tiles" in e.tables]
        if tail:
            lo = state.entries[0].version
            parts.append(_write_part(con, root, tail, lo, state.version, 0))
        while len(parts) > 1 and (compact or parts[-1].level >= parts[-2].level):
            a, b = parts[-2], parts[-1]
            merged = _write_part(con, root, [root / a.path, root / b.path], a.lo, b.hi, max(a.level, b.level) + 1)
            parts[-2:] = [merged]
        if parts:
            fsync_dir(root / PARTS)
        ckpt = Checkpoint(state.version, tables, tuple(parts), state.bytes())
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
