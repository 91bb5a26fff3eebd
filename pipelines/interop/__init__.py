"""Adopt features extracted by TRIDENT, CLAM or STAMP, and write a store's features back in their layouts.

Each tool writes one HDF5 file per slide, named after the slide (``<slide stem>.h5``), holding the
features and each tile's ``coords``; one module per tool (``trident``, ``clam``, ``stamp``) knows its
dataset and attribute names and its coordinate convention, and ``_registry.REGISTRY`` lists them.

Mapping into the store (assumptions, since the files do not say everything):

- **Slide.** With ``slides_dir``, the slide file of the same stem is fingerprinted and described like
  ``fs slides add`` does, so imported features join slides extracted here. Without it, the slide id is
  derived from the h5 file name and its coordinates (so a second encoder's file over the same patches
  maps to the same slide); ``path`` is the h5 file, ``bytes`` its size, width/height the extent of the
  tiles, and µm/px is ``assume_mpp``, else what the layout implies (TRIDENT's magnification, STAMP's tile
  µm/px); always flagged ``mpp_assumed``. CLAM files say nothing about µm/px, so they need
  ``slides_dir`` or ``assume_mpp``.
- **Tiling.** Nominal physical size, so all slides of a cohort share one tiling and one embedding set
  (each layout module says how it reads it). Tissue detection was the other tool's, so
  ``tissue_method`` is "none" and ``min_tissue`` 0; every imported tile has ``tissue_fraction`` 1.0
  (the tool kept it).
- **Encoder.** Name from ``model_name``, else what the layout records (STAMP's ``extractor``, TRIDENT's
  ``features_<name>`` folder). The weights are unknown: ``weights_sha256`` is the sha256 of
  "imported:<layout>:<name>:<dim>:<STAMP code hash>", a provenance hash under which all files of one
  extraction share one encoder; mean/std are the identity and pooling "pooler" (the model's own output).
- **Features** are stored in their own dtype (float16 for STAMP, float32 otherwise; float64 becomes
  float32), so exporting them again is bit-exact.
- **Provenance**: one ``imports`` row per file (source path, sha256, layout, every attribute with its
  dtype, coordinates verbatim when they are not level-0 pixels, the bag commit), written in the bag's own
  commit, and a ``runs`` row.
  Export writes an imported bag back verbatim (attributes and coordinates) while its bag is unchanged.
"""

from featurestore.pipelines.interop._export import ExportReport, RenamedFile, export_features
from featurestore.pipelines.interop._import import (
    IMPORTS_TABLE,
    ImportedFile,
    ImportReport,
    SkippedFile,
    feature_files,
    import_features,
)
from featurestore.pipelines.interop._layout import Header, ImportOptions, Layout, Placement
from featurestore.pipelines.interop._registry import LAYOUTS, REGISTRY, layout_named
from featurestore.pipelines.interop.errors import InteropError

__all__ = ["IMPORTS_TABLE", "LAYOUTS", "REGISTRY", "ExportReport", "Header", "ImportOptions", "ImportReport",
           "ImportedFile", "InteropError", "Layout", "Placement", "RenamedFile", "SkippedFile", "export_features",
           "feature_files", "import_features", "layout_named"]
