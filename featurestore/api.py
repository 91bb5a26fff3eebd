"""Notebook entry points that belong to no one package: ``featurestore.open`` and ``featurestore.vectors``.

The rest of the notebook API lives with what it needs: SQL and tile reads on ``Store``/``Snapshot``,
``bags`` in ``featurestore.distill.data`` (PyTorch), ``search`` in ``featurestore.index`` (FAISS);
``featurestore`` re-exports them all, each loaded on first use.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from featurestore.schemas import InvalidArgumentError
from featurestore.store import Store


def open(path: str | os.PathLike[str], *, read_only: bool = True) -> Store:  # noqa: A001 - featurestore.open
    """Open an existing store for reading: writes raise ``ReadOnlyError`` unless ``read_only=False``.

    The handle is a context manager; each read uses the newest version, and ``store.snapshot()``
    pins one version for reads that must agree. ``NotAStoreError`` when ``path`` holds no store.
    """
    if not isinstance(path, str | os.PathLike):
        raise InvalidArgumentError(f"path must be the store's directory (str or Path), got {type(path).__name__}")
    if not isinstance(read_only, bool):
        raise InvalidArgumentError(f"read_only must be True or False, got {read_only!r}")
    return Store.open(path, read_only=read_only)


def vectors(table: pa.Table | pa.ChunkedArray | pa.Array, column: str = "embedding") -> np.ndarray:
    """A vector column as an ``(n, dim)`` float32 array whose row i is row i of ``table``.

    For the ``embedding`` column of ``Store.tiles`` and of SQL over ``emb_<model>`` or
    ``slide_emb_<model>``; ``table`` may also be the column itself.
    """
    if isinstance(table, pa.Table):
        if column not in table.column_names:
            raise InvalidArgumentError(f"column: the table has no column {column!r}; it has "
                                       f"{', '.join(table.column_names) or 'none'}")
        values = table.column(column)
    elif isinstance(table, pa.ChunkedArray | pa.Array):
        values = table
    else:
        raise InvalidArgumentError(f"table must be a pyarrow Table or column, got {type(table).__name__}")
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    kind = values.type
    if not (pa.types.is_fixed_size_list(kind) and pa.types.is_floating(kind.value_type)):
        raise InvalidArgumentError(f"column {column!r} holds {kind}, not vectors (FLOAT[dim]); select the "
                                   "embedding column of tiles() or of an emb_<model> view")
    if values.null_count:
        raise InvalidArgumentError(f"column {column!r} has {values.null_count} null rows; filter them out first "
                                   f"(WHERE {column} IS NOT NULL)")
    flat = values.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(values), kind.list_size).astype(np.float32, copy=False)
