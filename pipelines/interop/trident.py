"""TRIDENT (``features_<encoder>/<slide>.h5``): ``features`` (n, d) and ``coords`` (n, 2) in level-0 pixels.

What TRIDENT 0.3 writes (mahmoodlab/TRIDENT v0.3.1): ``trident/IO.py::coords_to_h5`` puts the patching
attributes on ``coords`` of the patch file; ``trident/wsi_objects/WSI.py::WSI.extract_patch_features``
copies them onto ``coords`` of the feature file and adds the ``features`` attributes, both through
``IO.save_h5``; the file itself gets none.

- ``coords``: ``patch_size`` (int, px at the target magnification), ``patch_size_level0`` (the patch edge in
  level-0 px, ``patch_size * level0_magnification // target_magnification``), ``level0_magnification`` (int),
  ``target_magnification``, ``overlap`` (int, target px), ``name`` and ``savetodir`` (str), ``level0_width``
  and ``level0_height`` (int). ``run_batch_of_slides.py`` parses ``--mag`` as a float, so in its files
  ``target_magnification`` and therefore ``patch_size_level0`` are floats (whole numbers); files of
  ``run_single_slide.py`` and of TRIDENT < 0.2.4 have ints, and those < 0.2.2 lack the level-0 size.
- ``features``: ``name``, ``savetodir`` and ``encoder`` (str; absent before 0.2.2).

Magnifications become µm/px by TRIDENT's own convention, 20x = 0.5 µm/px (µm/px = 10 / magnification).
The encoder is the ``encoder`` attribute, else the ``features_<name>`` folder.

Export writes these attributes with TRIDENT 0.3's batch types, plus :data:`STRIDE` on ``coords``. TRIDENT's
magnifications come from ``WSI._fetch_magnification``, which bins µm/px into nominal objectives (0.263 µm/px
is "40x"), so its formula would claim 448 px patches on a 0.263 µm/px slide whose tiles here are 426 px.
Export keeps the formula's meaning with the slide's true µm/px instead: ``level0_magnification`` is
``round(10 / µm/px)`` and ``patch_size_level0`` the level-0 edge the tiles were read at,
``round(patch_size * target µm/px / µm/px)``, a whole number as in every TRIDENT file. On slides at a nominal
µm/px (0.25, 0.5, ...) or close enough that rounding hides it (0.499), both equal TRIDENT's own values.
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

STRIDE = "featurestore_stride_level0"
"""``coords`` attribute of exports, not TRIDENT's: the exact level-0 px between neighbouring tile origins (tile
``i`` starts at ``floor(i * stride + 0.5)``), which ``patch_size_level0`` can only round. TRIDENT's readers
take ``coords`` attributes as a dict and look up the keys they need, so an extra one is carried along."""


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
        footprint = round(float(header.value("coords", LEVEL0_SIZE, fix=fix)))
        objective = float(header.value("coords", "level0_magnification", fix=fix))
        target_mpp = 10.0 / float(header.value("coords", "target_magnification", fix=fix))
        overlap = int(header.value("coords", "overlap", 0))
        stride = float(header.value("coords", STRIDE, 0.0))
        exact_mpp = (tile_size - overlap) * target_mpp / stride if stride else None
        mpp = slide.mpp_x if slide else opts.assume_mpp or exact_mpp or 10.0 / objective
        return Placement(header.coords[:, 0], header.coords[:, 1], level=0, read_size=footprint, footprint=footprint,
                         tile_size=tile_size, target_mpp=target_mpp, overlap=overlap, mpp=mpp, objective=objective)

    def model_name(self, header: Header) -> str | None:
        encoder = header.value("features", "encoder", "None")
        if encoder != "None":  # TRIDENT writes an encoder without a name as the string 'None'
            return str(encoder)
        parent = header.path.parent.name
        return parent.removeprefix("features_") if parent.startswith("features_") else None

    def export_attrs(self, provenance: dict[str, str], *, name: str, out_dir: Path, slide: Slide,
                     tiling: TilingSpec, es: EmbeddingSet, tiles: pa.Table) -> dict[str, dict[str, Any]]:
        scale = tiling.target_mpp / slide.mpp_x  # level-0 px per target px, as featurestore.slides.tiling cuts tiles
        return {"file": provenance,
                "features": {"name": name, "savetodir": str(out_dir), "encoder": es.encoder_name},
                "coords": {
                    "patch_size": np.int64(tiling.tile_size),
                    LEVEL0_SIZE: np.float64(max(1, round(tiling.tile_size * scale))),
                    "level0_magnification": np.int64(round(10 / slide.mpp_x)),
                    "target_magnification": np.float64(10 / tiling.target_mpp),
                    "overlap": np.int64(tiling.overlap), "name": name, "savetodir": str(out_dir),
                    "level0_width": np.int64(slide.width), "level0_height": np.int64(slide.height),
                    STRIDE: np.float64(tiling.stride * scale)}}


LAYOUT = Trident()
