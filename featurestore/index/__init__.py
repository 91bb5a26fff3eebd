"""Nearest-neighbour search over embedding sets: FAISS indexes versioned with their bags, joined to SQL."""

from featurestore.index._build import (
    EXACT_FILTER_MAX,
    POOLED_SCHEMA,
    POOLED_TABLE,
    BuildReport,
    TileIndex,
    build_index,
    index_status,
    load_index,
)
from featurestore.index._contact import contact_sheet, tile_pixels
from featurestore.index._errors import (
    IndexBuildError,
    IndexConfigError,
    IndexMissingError,
    QueryError,
    StaleIndexError,
)
from featurestore.index._faiss import (
    EXACT_BELOW,
    KINDS,
    IndexKind,
    IndexParams,
    default_params,
    gpu_available,
)
from featurestore.index._manifest import BagVersion, IndexStatus, Manifest
from featurestore.index._search import embed_image, search

__all__ = [
    "EXACT_BELOW", "EXACT_FILTER_MAX", "KINDS", "POOLED_SCHEMA", "POOLED_TABLE", "BagVersion", "BuildReport",
    "IndexBuildError", "IndexConfigError", "IndexKind", "IndexMissingError", "IndexParams", "IndexStatus",
    "Manifest", "QueryError", "StaleIndexError", "TileIndex", "build_index", "contact_sheet",
    "default_params", "embed_image", "gpu_available", "index_status", "load_index", "search", "tile_pixels",
]
