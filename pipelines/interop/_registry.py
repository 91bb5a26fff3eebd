"""The layouts ``fs import`` reads and ``fs export`` writes; every list of layout names derives from ``REGISTRY``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from featurestore.pipelines.interop import clam, stamp, trident
from featurestore.pipelines.interop._layout import Layout
from featurestore.pipelines.interop.errors import InteropError

if TYPE_CHECKING:
    import h5py

REGISTRY: dict[str, Layout] = {layout.name: layout for layout in (trident.LAYOUT, clam.LAYOUT, stamp.LAYOUT)}
LAYOUTS: tuple[str, ...] = tuple(REGISTRY)


def layout_named(name: str) -> Layout:
    try:
        return REGISTRY[name]
    except KeyError as err:
        raise InteropError(f"layout {name!r} is unknown; choose one of {', '.join(LAYOUTS)}") from err


def tools() -> str:
    """The tools' names for messages: "TRIDENT, CLAM or STAMP"."""
    titles = [layout.title for layout in REGISTRY.values()]
    return f"{', '.join(titles[:-1])} or {titles[-1]}" if len(titles) > 1 else titles[0]


def detect(path: Path, f: h5py.File) -> Layout:
    """The layout of an open file. A features dataset name that one tool alone writes decides before the
    attributes that tell apart tools sharing a name."""
    writers = Counter(layout.features for layout in REGISTRY.values())
    for layout in sorted(REGISTRY.values(), key=lambda layout: writers[layout.features]):
        if layout.recognises(f):
            return layout
    by_dataset: dict[str, list[str]] = {}
    for layout in REGISTRY.values():
        by_dataset.setdefault(layout.features, []).append(layout.title)
    expected = " nor ".join(f"'{name}' ({', '.join(titles)})" for name, titles in by_dataset.items())
    raise InteropError(f"{path}: neither {expected} is in the file; found {', '.join(f.keys()) or 'nothing'}")
