"""Adopt features extracted by TRIDENT, CLAM or STAMP, and write a store's features back in their layouts.

Each tool writes one HDF5 file per slide, named after the slide (``<slide stem>.h5``):

- TRIDENT (``features_<encoder>/``): ``features`` (n, d) and ``coords`` (n, 2), level-0 pixels of each
  tile's top-left corner. ``coords`` attrs: ``patch_size`` (px at the target magnification),
  ``patch_size_level0``, ``level0_magnification``, ``target_magnification``, ``overlap``, ``name``,
  ``savetodir``; ``features`` attrs: ``name``, ``savetodir``.
- CLAM (``h5_files/``): ``features`` and ``coords`` (level-0 px). ``coords`` carries ``patch_level`` and
  ``patch_size`` (px at that level) when the file came from CLAM's patching step; its feature files
  often carry no attrs, so ``--patch-size`` / ``--patch-level`` supply them.
- STAMP ≥ 2 (``<extractor>/``): ``feats`` (n, d), float16, and ``coords`` (n, 2) in µm; file attrs
  ``extractor``, ``unit`` = "um", ``tile_size_um`` (``tile_size`` before 2.1), ``tile_size_px``,
  ``stamp_version``, ``code_hash``, ``feat_type``.

Mapping into the store (assumptions, since the files do not say everything):

- **Slide.** With ``slides_dir``, the slide file of the same stem is fingerprinted and described like
  ``fs slides add`` does, so imported features join slides extracted here. Without it, the slide id is
  derived from the h5 file name and its coordinates (so a second encoder's file over the same patches
  maps to the same slide); ``path`` is the h5 file, ``bytes`` its size, width/height the extent of the
  tiles, and µm/px is ``assume_mpp``, else TRIDENT's 10 / ``level0_magnification`` (TRIDENT's own 20x =
  0.5 µm/px convention), else STAMP's tile µm/px; always flagged ``mpp_assumed``. CLAM files say
  nothing about µm/px, so they need ``slides_dir`` or ``assume_mpp``.
- **Tiling.** Nominal physical size, so all slides of a cohort share one tiling and one embedding set:
  TRIDENT 10 / ``target_magnification`` µm/px at ``patch_size``; STAMP ``tile_size_um / tile_size_px``;
  CLAM the level's µm/px rounded to 0.01 (scanners of one nominal magnification agree). Tissue
  detection was the other tool's, so ``tissue_method`` is "none" and ``min_tissue`` 0; every imported
  tile has ``tissue_fraction`` 1.0 (the tool kept it).
- **Encoder.** Name from ``model_name``, else STAMP's ``extractor``, else TRIDENT's ``features_<name>``
  folder. The weights are unknown: ``weights_sha256`` is the sha256 of "imported:<layout>:<name>:<dim>:
  <STAMP code hash>", a provenance hash under which all files of one extraction share one encoder;
  mean/std are the identity and pooling "pooler" (the model's own output).
- **Features** are stored in their own dtype (float16 for STAMP, float32 otherwise; float64 becomes
  float32), so exporting them again is bit-exact.
- **Provenance**: one ``imports`` row per file (source path, sha256, layout, every attribute with its
  dtype, coordinates verbatim when they are not level-0 pixels, the bag commit), written in the bag's own
  commit, and a ``runs`` row.
  Export writes an imported bag back verbatim (attributes and coordinates) while its bag is unchanged.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import platform
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa

from featurestore.pipelines.discover import SLIDE_SUFFIXES, fingerprint
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

Layout = Literal["trident", "clam", "stamp"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
FEATURES_DATASET: dict[str, str] = {"trident": "features", "clam": "features", "stamp": "feats"}
IMPORTS_TABLE = "imports"
class InteropError(FsError, ValueError):
    """A feature file that cannot be imported as asked, or a set that cannot be exported in a layout."""


@dataclass(frozen=True)
class ImportOptions:
    """How to read feature files; every field is optional (see the module docstring for the defaults)."""

    layout: Layout | None = None
    slides_dir: Path | None = None
    model_name: str | None = None
    assume_mpp: float | None = None
    patch_size: int | None = None
    patch_level: int | None = None


@dataclass(frozen=True)
class _Header:
    """A feature file's coordinates, attributes and feature shape: everything but the features."""

    path: Path
    layout: Layout
    coords: np.ndarray
    attrs: dict[str, dict[str, Any]]
    n: int
    dim: int
    dtype: np.dtype


@dataclass(frozen=True)
class _Plan:
    """Everything one file's import will write, decided before anything is written."""

    header: _Header
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


@dataclass
class ImportReport:
    imported: list[tuple[Path, str, str, int]] = field(default_factory=list)
    """(file, slide_id, encoder name, tiles) of each file written to the store."""
    skipped: list[Path] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    run_id: str = ""


@dataclass(frozen=True)
class ExportReport:
    files: tuple[Path, ...]
    verbatim: int
    """Files written back exactly as imported (their bag is unchanged since the import)."""
    renamed: tuple[tuple[str, str], ...]
    """(slide_id, file name) where two slides share a file stem and the slide id was appended."""


# --- reading HDF5 --------------------------------------------------------------------------------


def _h5py():
    try:
        import h5py
    except ImportError as err:
        raise InteropError("reading and writing HDF5 feature files needs h5py; pip install h5py") from err
    return h5py


def _attr(value: Any) -> dict[str, Any]:
    """An HDF5 attribute as JSON that restores the same value and dtype."""
    if isinstance(value, str):
        return {"str": value}
    if isinstance(value, bytes | np.bytes_):
        return {"bytes": bytes(value).hex()}
    a = np.asarray(value)
    if a.dtype.kind == "O":
        return {"strs": [v.decode() if isinstance(v, bytes) else str(v) for v in a.ravel().tolist()],
                "shape": list(a.shape)}
    return {"dtype": a.dtype.str, "shape": list(a.shape), "value": a.tolist()}


def _unattr(encoded: dict[str, Any]) -> Any:
    if "str" in encoded:
        return encoded["str"]
    if "bytes" in encoded:
        return np.bytes_(bytes.fromhex(encoded["bytes"]))
    if "strs" in encoded:
        return np.array(encoded["strs"], dtype=_h5py().string_dtype()).reshape(encoded["shape"])
    return np.asarray(encoded["value"], dtype=np.dtype(encoded["dtype"])).reshape(encoded["shape"])


def _read_header(path: Path, layout: Layout | None) -> _Header:
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as f:
            found = layout or _detect(path, f)
            name = FEATURES_DATASET[found]
            if name not in f or "coords" not in f:
                found_names = ", ".join(f.keys())
                raise InteropError(f"{path}: no '{name}' and 'coords' datasets (found: {found_names}); not a "
                                   f"{found} feature file: pass --layout to say which tool wrote it")
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
    encoded = {k: {a: _attr(v) for a, v in d.items()} for k, d in attrs.items()}
    return _Header(path, found, coords, encoded, shape[0], shape[1], dtype)


def _detect(path: Path, f) -> Layout:
    if "feats" in f:
        return "stamp"
    if "features" in f:
        coords_attrs = f["coords"].attrs if "coords" in f else {}
        return "trident" if "patch_size_level0" in coords_attrs else "clam"
    raise InteropError(f"{path}: neither 'features' (TRIDENT, CLAM) nor 'feats' (STAMP) is in the file; "
                       f"found {', '.join(f.keys()) or 'nothing'}")


def _value(header: _Header, obj: str, name: str, fallback: Any = None, fix: str = "") -> Any:
    encoded = header.attrs[obj].get(name)
    if encoded is None:
        if fallback is not None:
            return fallback
        raise InteropError(f"{header.path}: {header.layout} attribute '{name}' is missing on {obj}; {fix}")
    value = _unattr(encoded)
    return value.item() if isinstance(value, np.ndarray) and value.shape == () else value


# --- planning ------------------------------------------------------------------------------------


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


def _real_slide(header: _Header, slides: dict[str, list[Path]], opts: ImportOptions) -> tuple[Slide, Any]:
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


def _plan(header: _Header, opts: ImportOptions, slides: dict[str, list[Path]] | None) -> _Plan:
    slide, downsamples = _real_slide(header, slides, opts) if slides is not None else (None, None)
    coords = header.coords
    code_hash = ""
    objective = None
    if header.layout == "trident":
        fix = "this file was not written by TRIDENT's patching; pass --layout clam if it came from CLAM"
        tile_size = int(_value(header, "coords", "patch_size", fix=fix))
        footprint = int(_value(header, "coords", "patch_size_level0", fix=fix))
        objective = float(_value(header, "coords", "level0_magnification", fix=fix))
        target_mpp = 10.0 / float(_value(header, "coords", "target_magnification", fix=fix))
        overlap = int(_value(header, "coords", "overlap", 0))
        mpp = slide.mpp_x if slide else opts.assume_mpp or 10.0 / objective
        x, y, level, read_size = coords[:, 0], coords[:, 1], 0, footprint
    elif header.layout == "clam":
        tile_size = int(_value(header, "coords", "patch_size", opts.patch_size,
                               "pass --patch-size N (the patch edge CLAM cut, in px at --patch-level)"))
        level = int(_value(header, "coords", "patch_level", opts.patch_level or 0))
        if slide is None and opts.assume_mpp is None:
            raise InteropError(f"{header.path}: CLAM files do not record µm/px; pass --slides DIR (to read "
                               "it from the slide) or --assume-mpp X (0.25 for 40x scans, 0.5 for 20x)")
        if level and downsamples is None:
            raise InteropError(f"{header.path}: patches were cut at level {level}, whose downsample only the "
                               "slide knows; pass --slides DIR")
        downsample = downsamples[level] if level else 1.0
        mpp = slide.mpp_x if slide else opts.assume_mpp
        target_mpp, overlap = round(mpp * downsample, 2), 0
        footprint = round(tile_size * downsample)
        x, y, read_size = coords[:, 0], coords[:, 1], tile_size
    else:
        unit = _value(header, "file", "unit", "", "")
        if unit != "um":
            raise InteropError(f"{header.path}: STAMP coordinates have unit {unit or 'unset'}; only STAMP "
                               "≥ 2 files (unit 'um') can be placed on the slide; re-extract with STAMP 2")
        fix = "this file was not written by STAMP ≥ 2"
        size_key = "tile_size_um" if "tile_size_um" in header.attrs["file"] else "tile_size"
        size_um = float(_value(header, "file", size_key, fix=fix))
        tile_size = int(_value(header, "file", "tile_size_px", fix=fix))
        code_hash = str(_value(header, "file", "code_hash", ""))
        target_mpp, overlap, level = size_um / tile_size, 0, 0
        mpp = slide.mpp_x if slide else opts.assume_mpp or target_mpp
        x, y = np.rint(coords[:, 0] / mpp), np.rint(coords[:, 1] / mpp)
        footprint = read_size = round(size_um / mpp)
    x, y = np.asarray(x, np.int64), np.asarray(y, np.int64)
    try:
        tiling = TilingSpec(target_mpp=target_mpp, tile_size=tile_size, overlap=overlap, tissue_method="none",
                            min_tissue=0.0, edge="drop")
        if slide is None:
            slide = _derived_slide(header, x, y, footprint, mpp, objective, level)
        name = opts.model_name or _model_name(header)
        dtype = "float16" if header.dtype == np.float16 else "float32"
        encoder = EncoderSpec(
            name=name, version=f"{header.layout}-import", embed_dim=header.dim, input_size=tile_size,
            weights_sha256=hashlib.sha256(f"imported:{header.layout}:{name}:{header.dim}:{code_hash}".encode()
                                          ).hexdigest(),
            mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), pooling="pooler",
            source=f"imported from {header.layout} HDF5 feature files (weights and preprocessing unknown)")
    except InvalidRecordError as err:
        raise InteropError(f"{header.path}: {err}") from err
    slide_from = f"slide file {slide.path}" if slides is not None else "derived from the h5 file (no slide)"
    return _Plan(header, slide, tiling, encoder, dtype, x, y, level, read_size, False, slide_from,
                 _sha256(header.path))


def _model_name(header: _Header) -> str:
    if header.layout == "stamp" and "extractor" in header.attrs["file"]:
        return str(_value(header, "file", "extractor"))
    parent = header.path.parent.name
    if header.layout == "trident" and parent.startswith("features_"):
        return parent.removeprefix("features_")
    raise InteropError(f"{header.path}: the file does not say which model made its features; "
                       "pass --model-name NAME (e.g. uni_v1)")


def _derived_slide(header: _Header, x: np.ndarray, y: np.ndarray, footprint: int, mpp: float,
                   objective: float | None, level: int) -> Slide:
    digest = hashlib.sha256(b"h5-import:v1:" + header.path.stem.encode()
                            + np.ascontiguousarray(header.coords, np.float64).tobytes()).hexdigest()[:32]
    return Slide(slide_id=digest, path=str(header.path.resolve()), bytes=header.path.stat().st_size,
                 vendor=f"unknown ({header.layout} import)", width=int(x.max()) + footprint,
                 height=int(y.max()) + footprint, mpp_x=mpp, mpp_y=mpp, objective_power=objective,
                 level_count=level + 1, mpp_assumed=True)


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


# --- import --------------------------------------------------------------------------------------


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for pkg in ("featurestore-path", "h5py", "numpy"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return json.dumps(found, sort_keys=True)


def import_features(store: Store, paths: list[str | Path], opts: ImportOptions = ImportOptions(), *,
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
        raise InteropError(f"no .h5 files under {', '.join(map(str, paths))}; point at TRIDENT, CLAM or "
                           "STAMP feature files or their folders")
    slides = _slide_files(opts.slides_dir) if opts.slides_dir is not None else None
    plans = [_plan(_read_header(f, opts.layout), opts, slides) for f in files]
    plans = _check_plans(store, plans)
    report = ImportReport(run_id=f"run-{time.time_ns()}-{os.getpid()}")
    run = Run(run_id=report.run_id, command=command, versions=_versions(), host=socket.gethostname(),
              started_at=utcnow())
    store.register(run)
    t0 = time.perf_counter()
    done = _done_imports(store)
    for plan in plans:
        h, slide_id = plan.header, plan.slide.slide_id
        set_id = EmbeddingSet(plan.tiling.id, plan.encoder.id, plan.encoder.name, h.dim, plan.dtype).id
        if done.get((set_id, slide_id)) == plan.sha256:
            report.skipped.append(h.path)
        else:
            try:
                _import(store, plan, set_id, report.run_id)
                report.imported.append((h.path, slide_id, plan.encoder.name, h.n))
            except (FsError, OSError) as err:
                failure = Failure(str(h.path), "import", type(err).__name__, str(err).splitlines()[0],
                                  slide_id, report.run_id)
                store.register(failure)
                report.failed.append(failure)
        if on_file:
            on_file(h.path)
    store.register(Run(run.run_id, command, run.versions, run.host, run.started_at, utcnow(),
                       time.perf_counter() - t0, 0.0, "failed" if report.failed else "ok"))
    return report


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
    with _h5py().File(h.path, "r") as f:
        features = f[FEATURES_DATASET[h.layout]][...]
    tiles = None if plan.reuse_tiles else tiles_table(plan.slide.slide_id, plan.tiling.id, plan.x, plan.y,
                                                      plan.level, plan.read_size, np.ones(h.n))
    pixel_coords = h.layout != "stamp"
    row = {
        "slide_id": plan.slide.slide_id, "set_id": set_id, "encoder_id": plan.encoder.id,
        "tiling_id": plan.tiling.id, "layout": h.layout, "source_path": str(h.path.resolve()),
        "source_sha256": plan.sha256, "source_bytes": h.path.stat().st_size,
        "attrs_json": json.dumps(h.attrs),
        "coords_dtype": h.coords.dtype.str,
        "source_coords": None if pixel_coords else np.asarray(h.coords, np.float64).ravel().tolist(),
        "slide_from": plan.slide_from, "run_id": run_id, "imported_at": utcnow(),
    }

    def provenance(commit_id: str) -> dict[str, pa.Table]:
        # In the bag's own commit: the import and its provenance appear together or not at all.
        return {IMPORTS_TABLE: pa.Table.from_pylist([row | {"bag_commit_id": commit_id}], schema=IMPORTS_SCHEMA)}

    store.commit_slide(SlideCommit(plan.slide, plan.tiling, tiles, {plan.encoder: features}, dtype=plan.dtype,
                                   tables=provenance))


# --- export --------------------------------------------------------------------------------------


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_h5(path: Path, layout: str, features: np.ndarray, coords: np.ndarray,
              attrs: dict[str, dict[str, Any]]) -> None:
    with _h5py().File(path, "w") as f:
        f.create_dataset(FEATURES_DATASET[layout], data=features)
        f.create_dataset("coords", data=coords)
        targets = {"file": f, "features": f[FEATURES_DATASET[layout]], "coords": f["coords"]}
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


def _generated_attrs(layout: str, name: str, out_dir: Path, slide: Slide, tiling: TilingSpec,
                     es: EmbeddingSet, tiles: pa.Table) -> dict[str, dict[str, Any]]:
    provenance = {"featurestore_set_id": es.id, "featurestore_slide_id": slide.slide_id}
    if layout == "trident":
        return {"file": provenance, "features": {"name": name, "savetodir": str(out_dir)}, "coords": {
            "patch_size": np.int64(tiling.tile_size),
            "patch_size_level0": np.int64(round(tiling.tile_size * tiling.target_mpp / slide.mpp_x)),
            "level0_magnification": np.int64(round(10 / slide.mpp_x)),
            "target_magnification": np.int64(round(10 / tiling.target_mpp)),
            "overlap": np.int64(tiling.overlap), "name": name, "savetodir": str(out_dir)}}
    if layout == "clam":
        return {"file": provenance, "features": {}, "coords": {
            "patch_level": np.int64(tiles.column("level")[0].as_py()),
            "patch_size": np.int64(tiles.column("read_size")[0].as_py())}}
    return {"features": {}, "coords": {}, "file": provenance | {
        "extractor": es.encoder_name, "unit": "um", "tile_size_px": np.int64(tiling.tile_size),
        "tile_size_um": np.float64(tiling.tile_size * tiling.target_mpp), "feat_type": "tile"}}


def export_features(store: Store, model: str, out_dir: str | Path, layout: str, *,
                    overwrite: bool = False) -> ExportReport:
    """Write one HDF5 file per slide of an embedding set in a tool's layout (see the module docstring).

    A bag imported from this layout and not re-written since is written back verbatim (features,
    coordinates and attributes); other bags get the layout's attributes computed from the store.
    Existing files are replaced only with ``overwrite``. Everything comes from one store snapshot.
    """
    if layout not in LAYOUTS:
        raise InteropError(f"layout {layout!r} is unknown; choose one of {', '.join(LAYOUTS)}")
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
        if row is not None and row["layout"] == layout and row["bag_commit_id"] == bags.get(slide_id):
            attrs = {k: {a: _unattr(v) for a, v in d.items()}
                     for k, d in json.loads(row["attrs_json"]).items()}
            if row["source_coords"] is not None:
                xy = np.array(row["source_coords"]).reshape(-1, 2)
            coords = xy.astype(np.dtype(row["coords_dtype"]))
            verbatim += 1
        else:
            slide = slides[slide_id]
            attrs = _generated_attrs(layout, name, out, slide, tiling, es, tiles)
            stamp = layout == "stamp"
            coords = (xy * np.array([slide.mpp_x, slide.mpp_y])).astype(np.float32) if stamp else xy
        path = out / f"{name}.h5"
        _write_atomic(path, lambda tmp, a=attrs, c=coords, e=emb: _write_h5(tmp, layout, e, c, a))
        files.append(path)
    renamed = tuple((sid, n) for sid, n in names.items() if n != Path(slides[sid].path).stem)
    return ExportReport(tuple(files), verbatim, renamed)
