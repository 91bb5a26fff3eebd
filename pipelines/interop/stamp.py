"""STAMP ≥ 2 (``<extractor>/<slide>.h5``): ``feats`` (n, d), float16, and ``coords`` (n, 2) in µm.

File attrs: ``extractor``, ``unit`` = "um", ``tile_size_um`` (``tile_size`` before 2.1),
``tile_size_px``, ``stamp_version``, ``code_hash``, ``feat_type``. The tiling's µm/px is
``tile_size_um / tile_size_px``; coordinates become level-0 pixels at the slide's µm/px, and the µm
values are kept so that an unchanged bag exports bit for bit. The encoder is named by ``extractor``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from featurestore.pipelines.interop._layout import Header, ImportOptions, Layout, Placement
from featurestore.pipelines.interop.errors import InteropError
from featurestore.schemas import EmbeddingSet, Slide, TilingSpec

if TYPE_CHECKING:
    import h5py


class Stamp(Layout):
    name = "stamp"
    title = "STAMP"
    features = "feats"
    level0_coords = False

    def recognises(self, f: h5py.File) -> bool:
        return "feats" in f

    def place(self, header: Header, opts: ImportOptions, slide: Slide | None,
              downsamples: Sequence[float] | None) -> Placement:
        unit = header.value("file", "unit", "", "")
        if unit != "um":
            raise InteropError(f"{header.path}: STAMP coordinates have unit {unit or 'unset'}; only STAMP "
                               "≥ 2 files (unit 'um') can be placed on the slide; re-extract with STAMP 2")
        fix = "this file was not written by STAMP ≥ 2"
        size_key = "tile_size_um" if "tile_size_um" in header.attrs["file"] else "tile_size"
        size_um = float(header.value("file", size_key, fix=fix))
        tile_size = int(header.value("file", "tile_size_px", fix=fix))
        code_hash = str(header.value("file", "code_hash", ""))
        target_mpp = size_um / tile_size
        mpp = slide.mpp_x if slide else opts.assume_mpp or target_mpp
        size = round(size_um / mpp)
        return Placement(np.rint(header.coords[:, 0] / mpp), np.rint(header.coords[:, 1] / mpp), level=0,
                         read_size=size, footprint=size, tile_size=tile_size, target_mpp=target_mpp, overlap=0,
                         mpp=mpp, code_hash=code_hash)

    def model_name(self, header: Header) -> str | None:
        return str(header.value("file", "extractor")) if "extractor" in header.attrs["file"] else None

    def export_attrs(self, provenance: dict[str, str], *, name: str, out_dir: Path, slide: Slide,
                     tiling: TilingSpec, es: EmbeddingSet, tiles: pa.Table) -> dict[str, dict[str, Any]]:
        return {"features": {}, "coords": {}, "file": provenance | {
            "extractor": es.encoder_name, "unit": "um", "tile_size_px": np.int64(tiling.tile_size),
            "tile_size_um": np.float64(tiling.tile_size * tiling.target_mpp), "feat_type": "tile"}}

    def export_coords(self, xy: np.ndarray, slide: Slide) -> np.ndarray:
        return (xy * np.array([slide.mpp_x, slide.mpp_y])).astype(np.float32)


LAYOUT = Stamp()
