"""Transactions: everything one commit writes appears at once, or not at all.

A transaction stages its Parquet tables and Zarr arrays under
``staging/<commit_id>/`` and publishes them with a single ``rename`` to
``commits/<commit_id>/``. A rename within one filesystem is atomic, so a reader
sees either the whole commit or none of it, and a writer killed at any point
leaves only an invisible staging directory behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featurestore.store import _arrays
from featurestore.store._layout import COMMITS, STAGING, new_commit_id
from schemas import TABLES, to_table
from schemas._record import Record


def _fsync_tree(root: Path) -> None:
    """Flush file contents and directory entries so a power cut after publish keeps the commit."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Transaction:
    """Collect tables and arrays, then publish them atomically on a clean exit."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.commit_id = new_commit_id()
        self.staging = root / STAGING / self.commit_id
        self.staging.mkdir(parents=True)
        self._records: dict[str, list[Record]] = {}
        self._tables: dict[str, pa.Table] = {}

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

    def _write_tables(self) -> None:
        for name, records in self._records.items():
            pq.write_table(to_table(records, TABLES[name], self.commit_id), self.staging / f"{name}.parquet")
        for name, table in self._tables.items():
            column = pa.array([self.commit_id] * table.num_rows, pa.string())
            pq.write_table(table.append_column("commit_id", column), self.staging / f"{name}.parquet")

    def publish(self) -> None:
        self._write_tables()
        _fsync_tree(self.staging)
        target = self.root / COMMITS / self.commit_id
        os.rename(self.staging, target)
        fd = os.open(self.root / COMMITS, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.publish()
        else:
            self.abort()
