"""The interface every layout implements, and the records its import and export code exchange with it.

A layout is one tool's per-slide HDF5 feature file: the dataset its features live in, how to tell
its files apart, where their coordinates put the tiles (``place``), and the attributes and
coordinates it writes back (``export_attrs``, ``export_coords``). Everything else about importing
and exporting is shared (``_import``, ``_export``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa

from featurestore.pipelines.interop._hdf5 import decode_attr
from featurestore.pipelines.interop.errors import InteropError
from featurestore.schemas import EmbeddingSet, Slide, TilingSpec

if TYPE_CHECKING:
    import h5py


@dataclass(frozen=True)
class ImportOptions:
    """How to read feature files; every field is optional (see the package docstring for the defaults)."""

    layout: str | None = None
    slides_dir: Path | None = None
    model_name: str | None = None
    assume_mpp: float | None = None
    patch_size: int | None = None
    patch_level: int | None = None


@dataclass(frozen=True)
class Header:
    """A feature file's coordinates, attributes and feature shape: everything but the features."""

    path: Path
    layout: Layout
    coords: np.ndarray
    attrs: dict[str, dict[str, Any]]
    """Attributes of ``file``, ``features`` and ``coords``, each encoded by ``_hdf5.encode_attr``."""
    n: int
    dim: int
    dtype: np.dtype

    def value(self, obj: str, name: str, fallback: Any = None, fix: str = "") -> Any:
        """Attribute ``name`` of ``obj`` decoded (a scalar as a Python value), else ``fallback``, else an error
        ending in ``fix``."""
        encoded = self.attrs[obj].get(name)
        if encoded is None:
            if fallback is not None:
                return fallback
            raise InteropError(f"{self.path}: {self.layout.name} attribute '{name}' is missing on {obj}; {fix}")
        value = decode_attr(encoded)
        return value.item() if isinstance(value, np.ndarray) and value.shape == () else value


@dataclass(frozen=True)
class Placement:
    """Where a file's tiles sit on the slide and the tiling they make, read from its header.

    ``x``/``y`` are level-0 pixels of each tile's top-left corner, ``level``/``read_size`` how the tile
    is read, ``footprint`` its level-0 edge, ``mpp`` the slide's level-0 µm/px, ``objective`` its
    magnification where the file says it, and ``code_hash`` the extraction code's hash where recorded.
    """

    x: np.ndarray
    y: np.ndarray
    level: int
    read_size: int
    footprint: int
    tile_size: int
    target_mpp: float
    overlap: int
    mpp: float
    objective: float | None = None
    code_hash: str = ""


class Layout(ABC):
    """One tool's per-slide HDF5 feature files."""

    name: ClassVar[str]
    """The ``--layout`` value."""
    title: ClassVar[str]
    """The tool's name in messages."""
    features: ClassVar[str]
    """The dataset holding the (n, d) features; ``coords`` (n, 2) sits beside it in every layout."""
    level0_coords: ClassVar[bool] = True
    """False where ``coords`` are not level-0 pixels: the import then keeps them verbatim for export."""

    @abstractmethod
    def recognises(self, f: h5py.File) -> bool:
        """Whether an open file is this layout's (used when ``--layout`` is not given)."""

    @abstractmethod
    def place(self, header: Header, opts: ImportOptions, slide: Slide | None,
              downsamples: Sequence[float] | None) -> Placement:
        """The tiles and tiling of a file; ``slide`` and its level ``downsamples`` when the slide file is known."""

    def model_name(self, header: Header) -> str | None:
        """The encoder's name where the file or its folder says it."""
        return None

    @abstractmethod
    def export_attrs(self, provenance: dict[str, str], *, name: str, out_dir: Path, slide: Slide,
                     tiling: TilingSpec, es: EmbeddingSet, tiles: pa.Table) -> dict[str, dict[str, Any]]:
        """Attributes of ``file``, ``features`` and ``coords`` for a bag made in a store; ``provenance`` goes on
        the file. ``name`` is the file stem, ``tiles`` the bag's tiles table."""

    def export_coords(self, xy: np.ndarray, slide: Slide) -> np.ndarray:
        """The ``coords`` dataset for level-0 pixel corners ``xy`` (n, 2)."""
        return xy
