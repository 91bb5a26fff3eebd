"""Transactions: everything one commit writes appears at once, or not at all.

A transaction stages its Parquet tables and Zarr arrays under ``staging/<commit_id>/``, records
every file with its size and sha256 in ``_manifest.json``, flushes the tree, renames it to
``commits/<commit_id>/`` and finally claims the next log version for it. Only the log entry makes
the commit visible, so a writer killed at any step leaves an invisible directory behind (staging
or an unlogged commit) that ``vacuum`` removes later.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featurestore.schemas import TABLES, StoreWriteError, to_table
from featurestore.schemas._record import Record
from featurestore.store import _arrays, _log, _manifest
from featurestore.store._layout import COMMITS, STAGING, fsync_dir, new_commit_id


def fsync_tree(root: Path) -> None:
    """Flush file contents and directory entries so a power cut after publish keeps the commit."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
"""Errors that say the store's disk refused a write, as opposed to a bad slide or bad data."""


class Transaction:
    """Collect tables and arrays, then publish them atomically on a clean exit.

    ``known_version`` returns a published version to probe forward from; ``on_publish`` is told
    the log entry once the commit is visible (the store uses it for automatic checkpoints).
    """

    def __init__(self, root: Path, known_version: Callable[[], int],
                 on_publish: Callable[[_log.LogEntry], None] | None = None, *, commit_id: str | None = None) -> None:
        self.root = root
        self.commit_id = commit_id or new_commit_id()
        self.staging = root / STAGING / self.commit_id
        try:
            self.staging.mkdir(parents=True)
        except OSError as err:
            if err.errno in DISK_ERRORS:
                raise _refused(root, err) from err
            raise
        self._known_version = known_version
        self._on_publish = on_publish
        self._records: dict[str, list[Record]] = {}
        self._tables: dict[str, pa.Table] = {}
        self.entry: _log.LogEntry | None = None

    def add(self, *records: Record) -> None:
        for r in records:
            table = next(name for name, cls in TABLES.items() if cls is type(r))
            self._records.setdefault(table, []).append(r)

    def add_table(self, name: str, table: pa.Table) -> None:
        """Add a ready Arrow table (tiles, labels); ``commit_id`` is appended on publish."""
        self._tables[name] = table

    def write_embeddings(self, set_id: str, data: np.ndarray) -> None:
        _arrays.write_embeddings(self.staging / "emb" / set_id, data)

    def write_pixels(self, tiling_id: str, data: np.ndarray) -> None:
        _arrays.write_pixels(self.staging / "pix" / tiling_id, data)

    def _write_tables(self) -> tuple[str, ...]:
        """Write every table; return the slides the commit touches."""
        tables = {name: to_table(records, TABLES[name], self.commit_id) for name, records in self._records.items()}
        for name, table in self._tables.items():
            tables[name] = table.append_column("commit_id", pa.array([self.commit_id] * table.num_rows, pa.string()))
        slides = set()
        for name, table in tables.items():
            pq.write_table(table, self.staging / f"{name}.parquet")
            if "slide_id" in table.column_names and table.num_rows:
                slides.update(s for s in pc.unique(table.column("slide_id")).to_pylist() if s)
        return tuple(sorted(slides))

    def publish(self) -> _log.LogEntry:
        slides = self._write_tables()
        files = _manifest.build(self.staging)
        _manifest.write(self.staging, self.commit_id, files)
        fsync_tree(self.staging)
        os.rename(self.staging, self.root / COMMITS / self.commit_id)
        fsync_dir(self.root / COMMITS)
        self.entry = _log.append(self.root, self._known_version(), commit_id=self.commit_id,
                                 tables=_manifest.table_sizes(files), slides=slides,
                                 size=sum(size for size, _ in files.values()))
        if self._on_publish is not None:
            self._on_publish(self.entry)
        return self.entry

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            try:
                self.publish()
                return
            except BaseException as err:
                # A failed publish (disk full, Ctrl-C) must not leave a half-written staging tree behind.
                exc = err
        self.abort()
        if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:
            raise _refused(self.root, exc) from exc
        if exc_type is None:
            raise exc


def _refused(root: Path, err: OSError) -> StoreWriteError:
    return StoreWriteError(f"{root}: cannot write to the store ({err.strerror or err}); free space, raise the "
                           "quota or fix permissions, then re-run: nothing was committed")
