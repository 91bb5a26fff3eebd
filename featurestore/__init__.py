"""Cached-feature store for computational pathology: ``Store`` writes and maintains it, ``Snapshot`` reads it."""

import os
import tempfile
from typing import TYPE_CHECKING

# zarr imports cupy when it is installed (it comes with cuCIM), and importing cupy creates
# ~/.cupy/kernel_cache: a plain command must not write to $HOME. A user's own setting wins.
os.environ.setdefault("CUPY_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"cupy-cache-{os.getuid()}"))

if TYPE_CHECKING:
    from featurestore.store import Snapshot, Store

__all__ = ["Snapshot", "Store"]


def __getattr__(name: str):
    # Resolved on first use, so `import featurestore.slides` (a reader, a worker) does not load DuckDB and zarr.
    if name in __all__:
        from featurestore import store

        return getattr(store, name)
    raise AttributeError(f"module 'featurestore' has no attribute {name!r}")
