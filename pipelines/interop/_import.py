"""``fs import``: per-slide feature files become slides, tiles and an embedding set, each checked before any write.

The layout modules read what their files say (``Layout.place``); everything the files leave unsaid
is decided here the same way for every layout (see the package docstring).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from featurestore.pipelines._versions import versions
from featurestore.pipelines.discover import SLIDE_SUFFIXES, fingerprint
from featurestore.pipelines.interop._hdf5 import encode_attr, h5py
from featurestore.pipelines.interop._layout import Header, ImportOptions, Placement
from featurestore.pipelines.interop._registry import detect, layout_named, tools
from featurestore.pipelines.interop.errors import InteropError
from featurestore.schemas import (
    IMPORTS_SCHEMA,
    EmbeddingSet,
    EncoderSpec,
    Failure,
    FsError,
    InvalidRecordError,
    Run,
    Slide,
    TilingSpec,
    utcnow,
)
from featurestore.store import SlideCommit, Store, tiles_table

IMPORTS_TABLE = "imports"
_DEFAULTS = ImportOptions()


class ImportedFile(NamedTuple):
    """A file written to the store; a tuple too, so callers may unpack (path, slide_id, encoder, tiles)."""

    path: Path
    slide_id: str
    encoder: str
    tiles: int


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass(frozen=True)
class ImportReport:
    imported: tuple[ImportedFile, ...]
    skipped: tuple[SkippedFile, ...]
    failed: tuple[Failure, ...]
    run_id: str


@dataclass(frozen=True)
class _Plan:
    """Everything one file's import will write, decided before anything is written."""

    header: Header
    slide: Slide
    tiling: TilingSpec
    encoder: EncoderSpec
    dtype: str
    x: np.ndarray
    y: np.ndarray
    level: int
    read_size: int
    reuse_tiles: bool
    slide_from: str
    sha256: str


def _read_header(path: Path, layout: str | None) -> Header:
    try:
        with h5py().File(path, "r") as f:
            found = layout_named(layout) if layout else detect(path, f)
            name = found.features
            if name not in f or "coords" not in f:
                found_names = ", ".join(f.keys())
                raise InteropError(f"{path}: no '{name}' and 'coords' datasets (found: {found_names}); not a "
                                   f"{found.name} feature file: pass --layout to say which tool wrote it")
            feats, coords = f[name], f["coords"][...]
            attrs = {"file": dict(f.attrs), "features": dict(feats.attrs), "coords": dict(f["coords"].attrs)}
            shape, dtype = feats.shape, feats.dtype
    except OSError as err:
        raise InteropError(f"{path}: cannot read as HDF5 ({str(err).splitlines()[0]}); "
                           "is it a complete feature file?") from err
    if len(shape) != 2 or coords.shape != (shape[0], 2) or shape[0] == 0:
        raise InteropError(f"{path}: features {shape} and coords {coords.shape} do not describe n ≥ 1 tiles "
                           "(expected (n, d) and (n, 2)); re-extract this slide")
    if dtype.kind != "f":
        raise InteropError(f"{path}: features have dtype {dtype}; expected floating point embeddings")
    encoded = {k: {a: encode_attr(v) for a, v in d.items()} for k, d in attrs.items()}
    return Header(path, found, coords, encoded, shape[0], shape[1], dtype)


def _slide_files(slides_dir: Path) -> dict[str, list[Path]]:
    by_stem: dict[str, list[Path]] = {}
    for p in sorted(slides_dir.rglob("*")):
        if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES:
            by_stem.setdefault(p.stem, []).append(p)
    return by_stem


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _real_slide(header: Header, slides: dict[str, list[Path]],
                opts: ImportOptions) -> tuple[Slide, Sequence[float]]:
    """The slide file of the same stem, described like ``fs slides add``, and its level downsamples."""
    from featurestore.pipelines.register import describe_slide
    from featurestore.slides import open_slide

    matches = slides.get(header.path.stem, [])
    if len(matches) != 1:
        what = "no slide" if not matches else f"{len(matches)} slides ({', '.join(map(str, matches))})"
        raise InteropError(f"{header.path}: {what} named {header.path.stem}.* under {opts.slides_dir}; "
                           "keep one slide per name there, or drop --slides to import without slide files")
    path = matches[0]
    slide = describe_slide(path, fingerprint(path), assume_mpp=opts.assume_mpp)
    with open_slide(path) as reader:
        return slide, reader.level_downsamples


def _plan(header: Header, opts: ImportOptions, slides: dict[str, list[Path]] | None) -> _Plan:
    slide, downsamples = _real_slide(header, slides, opts) if slides is not None else (None, None)
    layout = header.layout
    where = layout.place(header, opts, slide, downsamples)
    x, y = np.asarray(where.x, np.int64), np.asarray(where.y, np.int64)
    try:
        tiling = TilingSpec(target_mpp=where.target_mpp, tile_size=where.tile_size, overlap=where.overlap,
                            tissue_method="none", min_tissue=0.0, edge="drop")
        if slide is None:
            slide = _derived_slide(header, x, y, where)
        name = opts.model_name or _model_name(header)
        dtype = "float16" if header.dtype == np.float16 else "float32"
        provenance = f"imported:{layout.name}:{name}:{header.dim}:{where.code_hash}"
        encoder = EncoderSpec(
            name=name, version=f"{layout.name}-import", embed_dim=header.dim, input_size=where.tile_size,
            weights_sha256=hashlib.sha256(provenance.encode()).hexdigest(),
            mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), pooling="pooler",
            source=f"imported from {layout.name} HDF5 feature files (weights and preprocessing unknown)")
    except InvalidRecordError as err:
        raise InteropError(f"{header.path}: {err}") from err
    slide_from = f"slide file {slide.path}" if slides is not None else "derived from the h5 file (no slide)"
    return _Plan(header, slide, tiling, encoder, dtype, x, y, where.level, where.read_size, False, slide_from,
                 _sha256(header.path))


def _model_name(header: Header) -> str:
    name = header.layout.model_name(header)
    if name is None:
        raise InteropError(f"{header.path}: the file does not say which model made its features; "
                           "pass --model-name NAME (e.g. uni_v1)")
    return name


def _derived_slide(header: Header, x: np.ndarray, y: np.ndarray, where: Placement) -> Slide:
    """A slide named after the h5 file and its coordinates, so a second encoder's file over the same patches
    maps to the same slide."""
    digest = hashlib.sha256(b"h5-import:v1:" + header.path.stem.encode()
                            + np.ascontiguousarray(header.coords, np.float64).tobytes()).hexdigest()[:32]
    return Slide(slide_id=digest, path=str(header.path.resolve()), bytes=header.path.stat().st_size,
                 vendor=f"unknown ({header.layout.name} import)", width=int(x.max()) + where.footprint,
                 height=int(y.max()) + where.footprint, mpp_x=where.mpp, mpp_y=where.mpp,
                 objective_power=where.objective, level_count=where.level + 1, mpp_assumed=True)


def feature_files(paths: list[str | Path]) -> tuple[list[Path], list[str]]:
    """``.h5`` files under ``paths`` (files, folders searched recursively, globs), and paths matching none."""
    files: list[Path] = []
    missing: list[str] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*.h5") if q.is_file())
        elif p.is_file():
            files.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(raw), recursive=True) if m.endswith(".h5"))
            if not matches:
                missing.append(str(raw))
            files += matches
    return list(dict.fromkeys(files)), missing


def import_features(store: Store, paths: list[str | Path], opts: ImportOptions = _DEFAULTS, *,
                    command: str = "fs import",
                    on_file: Callable[[Path], None] | None = None) -> ImportReport:
    """Import per-slide HDF5 feature files; every file is checked before anything is written.

    A file already imported unchanged (same sha256, its bag not re-written since) is skipped, so
    re-running an import is cheap. Each file becomes one slide commit plus one ``imports`` row;
    ``on_file`` is called after each file (for progress).
    """
    files, missing = feature_files(paths)
    if missing:
        raise InteropError(f"{missing[0]}: no such file, folder or .h5 glob match; check the path")
    if not files:
        raise InteropError(f"no .h5 files under {', '.join(map(str, paths))}; point at {tools()} "
                           "feature files or their folders")
    slides = _slide_files(opts.slides_dir) if opts.slides_dir is not None else None
    plans = [_plan(_read_header(f, opts.layout), opts, slides) for f in files]
    plans = _check_plans(store, plans)
    run_id = f"run-{time.time_ns()}-{os.getpid()}"
    run = Run(run_id=run_id, command=command, versions=versions("featurestore-path", "h5py", "numpy"),
              host=socket.gethostname(), started_at=utcnow())
    store.register(run)
    t0 = time.perf_counter()
    done = _done_imports(store)
    imported: list[ImportedFile] = []
    skipped: list[SkippedFile] = []
    failed: list[Failure] = []
    for plan in plans:
        h, slide_id = plan.header, plan.slide.slide_id
        set_id = EmbeddingSet(plan.tiling.id, plan.encoder.id, plan.encoder.name, h.dim, plan.dtype).id
        if done.get((set_id, slide_id)) == plan.sha256:
            skipped.append(SkippedFile(h.path, "already imported: same sha256, and its bag is unchanged since"))
        else:
            try:
                _import(store, plan, set_id, run_id)
                imported.append(ImportedFile(h.path, slide_id, plan.encoder.name, h.n))
            except (FsError, OSError) as err:
                failure = Failure(str(h.path), "import", type(err).__name__, str(err).splitlines()[0],
                                  slide_id, run_id)
                store.register(failure)
                failed.append(failure)
        if on_file:
            on_file(h.path)
    store.register(Run(run.run_id, command, run.versions, run.host, run.started_at, utcnow(),
                       time.perf_counter() - t0, 0.0, "failed" if failed else "ok"))
    return ImportReport(tuple(imported), tuple(skipped), tuple(failed), run_id)


def _check_plans(store: Store, plans: list[_Plan]) -> list[_Plan]:
    """Refuse two files for one slide and model, and tiles that would replace a slide's other tiles;
    mark files whose slide is already tiled at the same coordinates (a second model) to reuse those tiles."""
    seen: dict[tuple[str, str], Path] = {}
    tiled: dict[str, set[str]] = {}
    tiles_of: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, str]] = {}
    checked = []
    for plan in plans:
        key = (plan.slide.slide_id, plan.encoder.id)
        if key in seen:
            raise InteropError(f"{plan.header.path}: same slide and model as {seen[key]}; import one of them")
        seen[key] = plan.header.path
        where = (plan.tiling.id, plan.slide.slide_id)
        if plan.tiling.id not in tiled:
            tiled[plan.tiling.id] = set(store.sql(f"SELECT slide_id FROM slide_tilings WHERE tiling_id = "
                                                  f"'{plan.tiling.id}'").column("slide_id").to_pylist())
        if where not in tiles_of and plan.slide.slide_id in tiled[plan.tiling.id]:
            tiles = store.read_tiles(*where)
            tiles_of[where] = (tiles.column("x").to_numpy(), tiles.column("y").to_numpy(), "the store")
        if where in tiles_of:
            x, y, source = tiles_of[where]
            if not (np.array_equal(x, plan.x) and np.array_equal(y, plan.y)):
                raise InteropError(f"{plan.header.path}: slide {plan.slide.slide_id} has other tiles for "
                                   f"tiling {plan.tiling.id} in {source}; importing both would orphan "
                                   "embeddings: import it into another store")
            plan = dataclasses.replace(plan, reuse_tiles=True)
        else:
            tiles_of[where] = (plan.x, plan.y, str(plan.header.path))
        checked.append(plan)
    return checked


def _done_imports(store: Store) -> dict[tuple[str, str], str]:
    """(set_id, slide_id) → sha256 of imports whose bag is still the one the import wrote."""
    rows = store.sql(f"SELECT * FROM {IMPORTS_TABLE}")
    bags = {(r["set_id"], r["slide_id"]): r["commit_id"]
            for r in store.sql("SELECT set_id, slide_id, commit_id FROM bags").to_pylist()}
    return {(r["set_id"], r["slide_id"]): r["source_sha256"] for r in rows.to_pylist()
            if bags.get((r["set_id"], r["slide_id"])) == r["bag_commit_id"]}


def _import(store: Store, plan: _Plan, set_id: str, run_id: str) -> None:
    h = plan.header
    with h5py().File(h.path, "r") as f:
        features = f[h.layout.features][...]
    tiles = None if plan.reuse_tiles else tiles_table(plan.slide.slide_id, plan.tiling.id, plan.x, plan.y,
                                                      plan.level, plan.read_size, np.ones(h.n))
    row = {
        "slide_id": plan.slide.slide_id, "set_id": set_id, "encoder_id": plan.encoder.id,
        "tiling_id": plan.tiling.id, "layout": h.layout.name, "source_path": str(h.path.resolve()),
        "source_sha256": plan.sha256, "source_bytes": h.path.stat().st_size,
        "attrs_json": json.dumps(h.attrs),
        "coords_dtype": h.coords.dtype.str,
        "source_coords": None if h.layout.level0_coords else np.asarray(h.coords, np.float64).ravel().tolist(),
        "slide_from": plan.slide_from, "run_id": run_id, "imported_at": utcnow(),
    }

    def provenance(commit_id: str) -> dict[str, pa.Table]:
        # In the bag's own commit: the import and its provenance appear together or not at all.
        return {IMPORTS_TABLE: pa.Table.from_pylist([row | {"bag_commit_id": commit_id}], schema=IMPORTS_SCHEMA)}

    store.commit_slide(SlideCommit(plan.slide, plan.tiling, tiles, {plan.encoder: features}, dtype=plan.dtype,
                                   tables=provenance))
