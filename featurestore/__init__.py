"""Cached-feature store for computational pathology: ``Store`` writes and maintains it, ``Snapshot`` reads it."""

import os
import tempfile

# zarr imports cupy when it is installed (it comes with cuCIM), and importing cupy creates
# ~/.cupy/kernel_cache: a plain command must not write to $HOME. A user's own setting wins.
os.environ.setdefault("CUPY_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"cupy-cache-{os.getuid()}"))

from featurestore.store import Snapshot, Store  # noqa: E402 - after the environment above

__all__ = ["Snapshot", "Store"]
