"""Nearest-neighbour search over embedding sets: FAISS indexes versioned with their bags, joined to SQL."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from featurestore.index._errors import (
    IndexBuildError,
    IndexConfigError,
    IndexMissingError,
    QueryError,
    StaleIndexError,
)
from featurestore.index._kinds import EXACT_BELOW, KINDS, IndexKind, default_kind

if TYPE_CHECKING:
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
    from featurestore.index._faiss import IndexParams, default_params, gpu_available
    from featurestore.index._manifest import BagVersion, IndexStatus, Manifest
    from featurestore.index._search import ImageEncoder, embed_image, search
    from featurestore.index._slide_sets import (
        SlideSet,
        is_slide_set,
        read_slide_set,
        search_slide_set,
        slide_set,
        slide_sets,
    )
    from featurestore.index._vacuum import IndexVacuumReport, vacuum

_LAZY: dict[str, str] = {
    **dict.fromkeys(("EXACT_FILTER_MAX", "POOLED_SCHEMA", "POOLED_TABLE", "BuildReport", "TileIndex",
                     "build_index", "index_status", "load_index"), "_build"),
    **dict.fromkeys(("contact_sheet", "tile_pixels"), "_contact"),
    **dict.fromkeys(("IndexParams", "default_params", "gpu_available"), "_faiss"),
    **dict.fromkeys(("BagVersion", "IndexStatus", "Manifest"), "_manifest"),
    **dict.fromkeys(("ImageEncoder", "embed_image", "search"), "_search"),
    **dict.fromkeys(("SlideSet", "is_slide_set", "read_slide_set", "search_slide_set", "slide_set", "slide_sets"),
                   "_slide_sets"),
    **dict.fromkeys(("IndexVacuumReport", "vacuum"), "_vacuum"),
}

__all__ = [
    "EXACT_BELOW", "EXACT_FILTER_MAX", "KINDS", "POOLED_SCHEMA", "POOLED_TABLE", "BagVersion", "BuildReport",
    "ImageEncoder", "IndexBuildError", "IndexConfigError", "IndexKind", "IndexMissingError", "IndexParams",
    "IndexStatus", "IndexVacuumReport", "Manifest", "QueryError", "SlideSet", "StaleIndexError", "TileIndex",
    "build_index", "contact_sheet", "default_kind", "default_params", "embed_image", "gpu_available",
    "index_status", "is_slide_set", "load_index", "read_slide_set", "search", "search_slide_set", "slide_set",
    "slide_sets", "tile_pixels", "vacuum",
]


def __getattr__(name: str) -> Any:
    # FAISS, PIL and the store load on first use, so the `fs` command can list the kinds without them.
    if name in _LAZY:
        return getattr(importlib.import_module(f"featurestore.index.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
