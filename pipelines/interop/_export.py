"""``fs export``: an embedding set as one HDF5 file per slide in a tool's layout, each written whole or not at all."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.pipelines.interop._hdf5 import decode_attr, h5py
from featurestore.pipelines.interop._import import IMPORTS_TABLE
from featurestore.pipelines.interop._registry import layout_named
from featurestore.pipelines.interop.errors import InteropError
from featurestore.schemas import Slide
from featurestore.store import Store


@dataclass(frozen=True)
class RenamedFile:
    """A slide whose file stem another slide also has: written as ``<stem>.h5`` with its slide id appended."""

    slide_id: str
    stem: str


@dataclass(frozen=True)
class ExportReport:
    files: tuple[Path, ...]
    verbatim: int
    """Files written back exactly as imported (their bag is unchanged since the import)."""
    renamed: tuple[RenamedFile, ...]


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to a hidden temporary name, then rename: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_h5(path: Path, features_name: str, features: np.ndarray, coords: np.ndarray,
              attrs: dict[str, dict[str, Any]]) -> None:
    with h5py().File(path, "w") as f:
        f.create_dataset(features_name, data=features)
        f.create_dataset("coords", data=coords)
        targets = {"file": f, "features": f[features_name], "coords": f["coords"]}
        for obj, values in attrs.items():
            for name, value in values.items():
                targets[obj].attrs[name] = value


def _file_names(slides: dict[str, Slide]) -> dict[str, str]:
    """One file stem per slide: the slide's own, with the slide id appended where two slides share it."""
    stems = {sid: Path(s.path).stem for sid, s in slides.items()}
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem] = counts.get(stem, 0) + 1
    return {sid: stem if counts[stem] == 1 else f"{stem}-{sid[:8]}" for sid, stem in stems.items()}


def export_features(store: Store, model: str, out_dir: str | Path, layout: str, *,
                    overwrite: bool = False) -> ExportReport:
    """Write one HDF5 file per slide of an embedding set in a tool's layout (see the package docstring).

    A bag imported from this layout and not re-written since is written back verbatim (features,
    coordinates and attributes); other bags get the layout's attributes computed from the store.
    Existing files are replaced only with ``overwrite``. Everything comes from one store snapshot.
    """
    spec = layout_named(layout)
    store = store.snapshot()
    es = store.embedding_set(model)
    if es.views != 1:
        raise InteropError(f"{store.root}: {es.encoder_name} stores {es.views} views per tile, and h5 "
                           "layouts hold one vector per tile; export a single-view embedding set")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InteropError(f"{out}: is a file; give a folder for the per-slide .h5 files")
    tiling = next(t for t in store.tilings() if t.id == es.tiling_id)
    bags = {r["slide_id"]: r["commit_id"] for r in store.sql(
        "SELECT slide_id, commit_id FROM bags WHERE set_id = ?", [es.id]).to_pylist()}
    slides = {s.slide_id: s for s in store.slides() if s.slide_id in bags}
    names = _file_names(slides)
    taken = [out / f"{n}.h5" for n in names.values() if (out / f"{n}.h5").exists()]
    if taken and not overwrite:
        raise InteropError(f"{taken[0]}: exists ({len(taken)} of the {len(names)} files would be replaced); "
                           "choose an empty folder, or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    rows = store.sql(f"SELECT * FROM {IMPORTS_TABLE} WHERE set_id = ?", [es.id])
    imported = {r["slide_id"]: r for r in rows.to_pylist()}
    files, verbatim = [], 0
    for slide_id, tiles, emb in store.iter_bags(es):
        row = imported.get(slide_id)
        name = names[slide_id]
        xy = np.stack([tiles.column("x").to_numpy(), tiles.column("y").to_numpy()], axis=1)
        if row is not None and row["layout"] == spec.name and row["bag_commit_id"] == bags.get(slide_id):
            attrs = {k: {a: decode_attr(v) for a, v in d.items()}
                     for k, d in json.loads(row["attrs_json"]).items()}
            if row["source_coords"] is not None:
                xy = np.array(row["source_coords"]).reshape(-1, 2)
            coords = xy.astype(np.dtype(row["coords_dtype"]))
            verbatim += 1
        else:
            slide = slides[slide_id]
            provenance = {"featurestore_set_id": es.id, "featurestore_slide_id": slide.slide_id}
            attrs = spec.export_attrs(provenance, name=name, out_dir=out, slide=slide, tiling=tiling, es=es,
                                      tiles=tiles)
            coords = spec.export_coords(xy, slide)
        path = out / f"{name}.h5"
        _write_atomic(path, lambda tmp, a=attrs, c=coords, e=emb: _write_h5(tmp, spec.features, e, c, a))
        files.append(path)
    renamed = tuple(RenamedFile(sid, n) for sid, n in names.items() if n != Path(slides[sid].path).stem)
    return ExportReport(tuple(files), verbatim, renamed)
