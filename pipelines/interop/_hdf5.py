"""h5py, imported only when a feature file is read or written, and HDF5 attributes as JSON that round-trips."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from featurestore.pipelines.interop.errors import InteropError


def h5py() -> ModuleType:
    try:
        import h5py
    except ImportError as err:
        raise InteropError("reading and writing HDF5 feature files needs h5py; pip install h5py") from err
    return h5py


def encode_attr(value: Any) -> dict[str, Any]:
    """An HDF5 attribute as JSON that restores the same value and dtype."""
    if isinstance(value, str):
        return {"str": value}
    if isinstance(value, bytes | np.bytes_):
        return {"bytes": bytes(value).hex()}
    a = np.asarray(value)
    if a.dtype.kind == "O":
        return {"strs": [v.decode() if isinstance(v, bytes) else str(v) for v in a.ravel().tolist()],
                "shape": list(a.shape)}
    return {"dtype": a.dtype.str, "shape": list(a.shape), "value": a.tolist()}


def decode_attr(encoded: dict[str, Any]) -> Any:
    if "str" in encoded:
        return encoded["str"]
    if "bytes" in encoded:
        return np.bytes_(bytes.fromhex(encoded["bytes"]))
    if "strs" in encoded:
        return np.array(encoded["strs"], dtype=h5py().string_dtype()).reshape(encoded["shape"])
    return np.asarray(encoded["value"], dtype=np.dtype(encoded["dtype"])).reshape(encoded["shape"])
