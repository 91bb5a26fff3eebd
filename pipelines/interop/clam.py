"""CLAM (``h5_files/<slide>.h5``): ``features`` (n, d) and ``coords`` (n, 2) in level-0 pixels.

``coords`` carries ``patch_level`` and ``patch_size`` (px at that level) when the file came from
CLAM's patching step; its feature files often carry no attributes at all, so ``--patch-size`` /
``--patch-level`` supply them. Nothing in the file says µm/px: it comes from the slide file or
``--assume-mpp``, and the tiling's µm/px is the level's rounded to 0.01 (scanners of one nominal
magnification agree). The file does not name its encoder either.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from featurestore.pipelines.interop._layout import Header, ImportOptions, Layout, Placement
from featurestore.pipelines.interop.errors import InteropError
from featurestore.pipelines.interop.trident import LEVEL0_SIZE
from featurestore.schemas import EmbeddingSet, Slide, TilingSpec

if TYPE_CHECKING:
    import h5py


class Clam(Layout):
    name = "clam"
    title = "CLAM"
    features = "features"

    def recognises(self, f: h5py.File) -> bool:
        return "features" in f and not ("coords" in f and LEVEL0_SIZE in f["coords"].attrs)

    def place(self, header: Header, opts: ImportOptions, slide: Slide | None,
              downsamples: Sequence[float] | None) -> Placement:
        tile_size = int(header.value("coords", "patch_size", opts.patch_size,
                                     "pass --patch-size N (the patch edge CLAM cut, in px at --patch-level)"))
        level = int(header.value("coords", "patch_level", opts.patch_level or 0))
        if slide is None and opts.assume_mpp is None:
            raise InteropError(f"{header.path}: CLAM files do not record µm/px; pass --slides DIR (to read "
                               "it from the slide) or --assume-mpp X (0.25 for 40x scans, 0.5 for 20x)")
        if level and downsamples is None:
            raise InteropError(f"{header.path}: patches were cut at level {level}, whose downsample only the "
                               "slide knows; pass --slides DIR")
        downsample = downsamples[level] if level else 1.0
        mpp = slide.mpp_x if slide else opts.assume_mpp
        return Placement(header.coords[:, 0], header.coords[:, 1], level=level, read_size=tile_size,
                         footprint=round(tile_size * downsample), tile_size=tile_size,
                         target_mpp=round(mpp * downsample, 2), overlap=0, mpp=mpp)

    def export_attrs(self, provenance: dict[str, str], *, name: str, out_dir: Path, slide: Slide,
                     tiling: TilingSpec, es: EmbeddingSet, tiles: pa.Table) -> dict[str, dict[str, Any]]:
        return {"file": provenance, "features": {}, "coords": {
            "patch_level": np.int64(tiles.column("level")[0].as_py()),
            "patch_size": np.int64(tiles.column("read_size")[0].as_py())}}


LAYOUT = Clam()
