"""Cached-feature store for computational pathology.

In a notebook::

    import featurestore as fs
    store = fs.open("demo/store")           # read-only Store; a context manager; its repr says what is inside
    store.sql("SELECT ...")                 # pyarrow Table (pandas=True: a DataFrame)
    store.tiles("uni")                      # tile rows with their embeddings
    fs.bags(store, "uni", label="label")    # torch Dataset of SlideBag records; DataLoader(collate_fn=fs.collate_bags)
    fs.search(store, "uni", tile_id=...)    # nearest tiles or slides (after `fs index build`)

``Store`` writes and maintains a store, ``Snapshot`` reads one version of it. Every name here is
imported on first use, so ``import featurestore.slides`` (a reader, a worker) loads no DuckDB,
zarr, torch or FAISS.
"""

import importlib
import os
import tempfile
from typing import TYPE_CHECKING

# zarr imports cupy when it is installed (it comes with cuCIM), and importing cupy creates
# ~/.cupy/kernel_cache: a plain command must not write to $HOME. A user's own setting wins.
os.environ.setdefault("CUPY_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"cupy-cache-{os.getuid()}"))

if TYPE_CHECKING:
    from featurestore.api import open, vectors
    from featurestore.distill.data import BagBatch, BagDataset, BagReader, SlideBag, bags, collate_bags
    from featurestore.index import search
    from featurestore.schemas import (
        BagNotFoundError,
        FsError,
        InvalidArgumentError,
        MissingDependencyError,
        NotAStoreError,
        NotFoundError,
        PixelsNotCachedError,
        ReadOnlyError,
        SqlError,
        StoreDamageError,
        TileIdsNotFoundError,
        TilesNotFoundError,
        UnknownEmbeddingSetError,
    )
    from featurestore.store import Snapshot, Store, StoreInfo

__all__ = [
    "BagBatch", "BagDataset", "BagNotFoundError", "BagReader", "FsError", "InvalidArgumentError",
    "MissingDependencyError", "NotAStoreError", "NotFoundError", "PixelsNotCachedError", "ReadOnlyError", "SlideBag",
    "Snapshot", "SqlError", "Store", "StoreDamageError", "StoreInfo", "TileIdsNotFoundError", "TilesNotFoundError",
    "UnknownEmbeddingSetError", "bags", "collate_bags", "open", "search", "vectors",
]

_HOMES = {
    "featurestore.api": ("open", "vectors"),
    "featurestore.store": ("Snapshot", "Store", "StoreInfo"),
    "featurestore.distill.data": ("BagBatch", "BagDataset", "BagReader", "SlideBag", "bags", "collate_bags"),
    "featurestore.index": ("search",),
    "featurestore.schemas": ("BagNotFoundError", "FsError", "InvalidArgumentError", "MissingDependencyError",
                             "NotAStoreError", "NotFoundError", "PixelsNotCachedError", "ReadOnlyError", "SqlError",
                             "StoreDamageError", "TileIdsNotFoundError", "TilesNotFoundError",
                             "UnknownEmbeddingSetError"),
}
"""Where each public name lives; ``__getattr__`` imports that module the first time the name is used."""
_HOME = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str):
    # Resolved on first use, so `import featurestore.slides` (a reader, a worker) does not load DuckDB and zarr.
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'featurestore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
