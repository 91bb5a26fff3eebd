"""Zarr v3 arrays for dense data: sharded so one slide is one file, compressed with zstd."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import zarr

EMBEDDING_CHUNK_ROWS = 256
"""Inner chunk of an embedding array: small enough for cheap random tile access, large enough to compress."""

PIXEL_CHUNK_TILES = 1
PIXEL_SHARD_TILES = 256


def _rows_to_shard(n: int, chunk: int) -> int:
    return max(chunk, -(-n // chunk) * chunk)


def write_embeddings(path: Path, data: np.ndarray) -> None:
    """Write (n, dim) or (n, views, dim) float embeddings as one shard of 256-row chunks.

    Byte-shuffled Blosc-zstd compresses float16 embeddings noticeably better than plain zstd.
    """
    import zarr  # imported on first use: zarr (and the cupy it probes for) costs 0.5 s of every CLI start
    from zarr.codecs import BloscCodec, BloscShuffle
    from zarr.storage import LocalStore

    n = data.shape[0]
    chunk = (min(EMBEDDING_CHUNK_ROWS, n), *data.shape[1:])
    shard = (_rows_to_shard(n, chunk[0]), *data.shape[1:])
    arr = zarr.create_array(
        LocalStore(path), shape=data.shape, dtype=data.dtype, chunks=chunk, shards=shard,
        compressors=BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle, typesize=data.dtype.itemsize),
    )
    arr[...] = data


def write_pixels(path: Path, data: np.ndarray) -> None:
    """Write (n, h, w, 3) uint8 tile pixels: one chunk per tile for random access, 256 tiles a shard."""
    import zarr
    from zarr.codecs import ZstdCodec
    from zarr.storage import LocalStore

    n = data.shape[0]
    chunk = (PIXEL_CHUNK_TILES, *data.shape[1:])
    shard = (_rows_to_shard(n, PIXEL_SHARD_TILES) if n >= PIXEL_SHARD_TILES else n, *data.shape[1:])
    arr = zarr.create_array(LocalStore(path), shape=data.shape, dtype=np.uint8, chunks=chunk, shards=shard,
                            compressors=ZstdCodec(level=3))
    arr[...] = data


def open_array(path: Path) -> zarr.Array:
    import zarr
    from zarr.storage import LocalStore

    return zarr.open_array(LocalStore(path, read_only=True), mode="r")
