"""TRIDENT (``features_<encoder>/<slide>.h5``): ``features`` (n, d) and ``coords`` (n, 2) in level-0 pixels.

``coords`` attrs: ``patch_size`` (px at the target magnification), ``patch_size_level0``,
``level0_magnification``, ``target_magnification``, ``overlap``, ``name``, ``savetodir``; ``features``
attrs: ``name``, ``savetodir``. Magnifications become µm/px by TRIDENT's own convention, 20x = 0.5 µm/px
(µm/px = 10 / magnification). The encoder is named by the ``features_<name>`` folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from featurestore.pipelines.interop._layout import Header, ImportOptions, Layout, Placement
from featurestore.schemas import EmbeddingSet, Slide, TilingSpec

if TYPE_CHECKING:
    import h5py

LEVEL0_SIZE = "patch_size_level0"
"""The ``coords`` attribute only TRIDENT writes: what tells its files from CLAM's."""


class Trident(Layout):
    name = "trident"
    title = "TRIDENT"
    features = "features"

    def recognises(self, f: h5py.File) -> bool:
        return "features" in f and "coords" in f and LEVEL0_SIZE in f["coords"].attrs

    def place(self, header: Header, opts: ImportOptions, slide: Slide | None,
              downsamples: Sequence[float] | None) -> Placement:
        fix = "this file was not written by TRIDENT's patching; pass --layout clam if it came from CLAM"
        tile_size = int(header.value("coords", "patch_size", fix=fix))
        footprint = int(header.value("coords", LEVEL0_SIZE, fix=fix))
        objective = float(header.value("coords", "level0_magnification", fix=fix))
        target_mpp = 10.0 / float(header.value("coords", "target_magnification", fix=fix))
        overlap = int(header.value("coords", "overlap", 0))
        mpp = slide.mpp_x if slide else opts.assume_mpp or 10.0 / objective
        return Placement(header.coords[:, 0], header.coords[:, 1], level=0, read_size=footprint, footprint=footprint,
                         tile_size=tile_size, target_mpp=target_mpp, overlap=overlap, mpp=mpp, objective=objective)

    def model_name(self, header: Header) -> str | None:
        parent = header.path.parent.name
        return parent.removeprefix("features_") if parent.startswith("features_") else None

    def export_attrs(self, provenance: dict[str, str], *, name: str, out_dir: Path, slide: Slide,
                     tiling: TilingSpec, es: EmbeddingSet, tiles: pa.Table) -> dict[str, dict[str, Any]]:
        return {"file": provenance, "features": {"name": name, "savetodir": str(out_dir)}, "coords": {
            "patch_size": np.int64(tiling.tile_size),
            LEVEL0_SIZE: np.int64(round(tiling.tile_size * tiling.target_mpp / slide.mpp_x)),
            "level0_magnification": np.int64(round(10 / slide.mpp_x)),
            "target_magnification": np.int64(round(10 / tiling.target_mpp)),
            "overlap": np.int64(tiling.overlap), "name": name, "savetodir": str(out_dir)}}


LAYOUT = Trident()
