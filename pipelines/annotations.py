"""``fs annotations import``: QuPath annotations → per-class geometry and per-tile overlaps in the store.

Each file is read, matched to its slide and checked against the slide's size before anything is
written; a file that fails is reported and the others go on. A slide's import is one commit: its
``annotations`` rows (one per class) and its ``tile_annotations`` rows for every tiling the slide
has, so the views never show classes of one import with overlaps of another.

A tiling extracted after an import gets its overlaps in its own commit (``overlaps_of_new_tiles``),
from the classes the store holds.

The way out is here too: ``write_qc_geojson`` (``fs extract --geojson``) writes a slide's tissue
contours and tile grid for QuPath, and ``class_predicate`` turns ``fs search --in-class`` into SQL.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
import pyarrow as pa
import shapely

from featurestore.schemas import (
    ANNOTATIONS_SCHEMA,
    TILE_ANNOTATIONS_SCHEMA,
    InvalidArgumentError,
    Slide,
    TileQuality,
    TilingSpec,
    utcnow,
)
from featurestore.slides import TissueMask
from featurestore.slides.geojson import (
    AnnotationClass,
    AnnotationError,
    annotation_classes,
    mask_polygons,
    read_qupath,
    tile_features,
    tile_overlaps,
    tissue_features,
    write_geojson,
)
from featurestore.store import Snapshot, Store

SUFFIXES = (".geojson", ".json")
"""File endings taken from folders and globs (QuPath writes .geojson; some scripts write .json)."""


@dataclass(frozen=True)
class ImportedAnnotations:
    """One file imported: its slide, each class's area (level-0 px²), and the overlap rows written."""

    path: Path
    slide_id: str
    classes: tuple[tuple[str, float], ...]
    tilings: int
    overlaps: int
    skipped_objects: int


@dataclass(frozen=True)
class RefusedAnnotations:
    path: Path
    message: str


@dataclass(frozen=True)
class AnnotationsReport:
    imported: tuple[ImportedAnnotations, ...]
    failed: tuple[RefusedAnnotations, ...]


@dataclass(frozen=True)
class _Plan:
    path: Path
    slide: Slide
    classes: list[AnnotationClass]
    sha256: str
    skipped: int


def annotation_files(paths: list[str | Path]) -> tuple[list[Path], list[str]]:
    """GeoJSON files under ``paths`` (files, folders searched recursively, globs), and paths matching none."""
    files: list[Path] = []
    missing: list[str] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.suffix.lower() in SUFFIXES and q.is_file())
        elif p.is_file():
            files.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(raw), recursive=True)
                             if Path(m).suffix.lower() in SUFFIXES)
            if not matches:
                missing.append(str(raw))
            files += matches
    return list(dict.fromkeys(files)), missing


def resolve_slide(slides: list[Slide], name: str, what: str) -> Slide:
    """The slide ``name`` designates: its id, a unique id prefix, its path, file name or file stem.

    ``what`` says where the name came from, for the message when no slide (or several) match.
    """
    by_id = {s.slide_id: s for s in slides}
    if name in by_id:
        return by_id[name]
    text = PurePath(name)
    matches = [s for s in slides if name in (s.path, str(Path(s.path).resolve()))]
    if not matches and Path(name).exists():
        matches = [s for s in slides if Path(s.path).resolve() == Path(name).resolve()]
    if not matches:
        matches = [s for s in slides if text.name in _names(s.path)]
    if not matches and len(name) >= 6:
        matches = [s for s in slides if s.slide_id.startswith(name)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise AnnotationError(f"{what}: no slide in the store is named {name!r} (by id, id prefix, path, file name "
                              "or stem); add the slide (fs slides add or fs extract) or pass --slide with its id "
                              "from `fs slides list`")
    listed = ", ".join(f"{s.slide_id[:12]} ({s.path})" for s in matches[:4])
    raise AnnotationError(f"{what}: {name!r} names {len(matches)} slides ({listed}); pass --slide with one slide id")


def _names(path: str) -> set[str]:
    """What a slide file is called: its name and stem (``x.ome.tiff`` also as ``x``)."""
    name = PurePath(path).name
    stem = PurePath(name).stem
    return {name, stem, stem.removesuffix(".ome")}


def footprint(slide: Slide, tiling: TilingSpec, level: int, read_size: int) -> int:
    """A tile's level-0 edge in pixels.

    Tiles read at level 0 (every imported TRIDENT file, and extractions at the slide's own
    resolution) are exactly ``read_size``; otherwise the tiling's physical size at the slide's
    µm/px, rounded as ``featurestore.slides.tiling`` cuts them (``read_size`` × the level's
    downsample would carry that level's rounding).
    """
    if level == 0:
        return read_size
    return max(1, round(tiling.tile_size * tiling.target_mpp / slide.mpp_x))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plan(path: Path, slides: list[Slide], slide: str | None) -> _Plan:
    # The content first: a file that is not QuPath's is refused as such, whatever it is called.
    objects, skipped = read_qupath(path)
    # The file name less its suffix ("CMU-1.svs.geojson" → "CMU-1.svs"): QuPath names exports after the image.
    target = resolve_slide(slides, slide, "--slide") if slide is not None else resolve_slide(
        slides, path.name.removesuffix(path.suffix), str(path))
    classes = annotation_classes(objects, path, target.width, target.height)
    if not classes:
        raise AnnotationError(f"{path}: every annotation lies outside slide {target.slide_id}'s area; export from "
                              "the image this slide is, or name the right slide with --slide")
    return _Plan(path, target, classes, _sha256(path), skipped)


def class_overlaps(slide: Slide, tiling: TilingSpec, tiles: pa.Table, classes: Iterable[AnnotationClass]) -> pa.Table:
    """``tile_annotations`` rows of one tiling of ``slide``: each class × each tile it covers more than 0 of."""
    if tiles.num_rows == 0:
        return TILE_ANNOTATIONS_SCHEMA.empty_table()
    sid, tid = slide.slide_id, tiling.id
    edge = footprint(slide, tiling, tiles.column("level")[0].as_py(), tiles.column("read_size")[0].as_py())
    x, y = tiles.column("x").to_numpy(), tiles.column("y").to_numpy()
    index, ids = tiles.column("tile_index").to_numpy(), tiles.column("tile_id").to_numpy()
    parts = [TILE_ANNOTATIONS_SCHEMA.empty_table()]
    for cls in classes:
        hit, fraction = tile_overlaps(cls.geometry, x, y, edge)
        parts.append(pa.table({
            "slide_id": pa.array([sid] * len(hit), pa.string()), "tiling_id": pa.array([tid] * len(hit), pa.string()),
            "tile_index": index[hit], "tile_id": ids[hit],
            "class_name": pa.array([cls.name] * len(hit), pa.string()), "overlap": fraction},
            schema=TILE_ANNOTATIONS_SCHEMA))
    return pa.concat_tables(parts)


def _overlap_rows(snap: Snapshot, plan: _Plan, tilings: dict[str, TilingSpec]) -> tuple[pa.Table, int]:
    """Every tiling of the slide × every class: the tiles with overlap > 0, as one table; and the tilings seen."""
    sid = plan.slide.slide_id
    tiling_ids = snap.sql("SELECT tiling_id FROM slide_tilings WHERE slide_id = ? ORDER BY tiling_id",
                          [sid]).column("tiling_id").to_pylist()
    table = pa.concat_tables([TILE_ANNOTATIONS_SCHEMA.empty_table()] + [
        class_overlaps(plan.slide, tilings[tid], snap.read_tiles(tid, sid), plan.classes) for tid in tiling_ids])
    return table, len(tiling_ids)


def stored_classes(store: Store | Snapshot, slide_id: str) -> list[AnnotationClass]:
    """The annotation classes the store holds for a slide (its latest import), empty when it has none."""
    rows = store.sql("SELECT class_name, geometry FROM annotations WHERE slide_id = ? ORDER BY class_name",
                     [slide_id]).to_pylist()
    return [AnnotationClass(r["class_name"], shapely.from_geojson(r["geometry"])) for r in rows]


def overlaps_of_new_tiles(store: Store, slide: Slide, layers: Iterable[tuple[TilingSpec, pa.Table]]
                          ) -> dict[str, pa.Table]:
    """The ``tile_annotations`` rows to commit with a slide's new tiles, so a tiling cut after an import
    has its overlaps at once; nothing when the slide has no annotations."""
    classes = stored_classes(store, slide.slide_id)
    if not classes:
        return {}
    return {"tile_annotations": pa.concat_tables([class_overlaps(slide, tiling, tiles, classes)
                                                  for tiling, tiles in layers])}


def _commit(store: Store, snap: Snapshot, plan: _Plan, tilings: dict[str, TilingSpec]) -> ImportedAnnotations:
    overlaps, n_tilings = _overlap_rows(snap, plan, tilings)
    now = utcnow()
    rows = [{"slide_id": plan.slide.slide_id, "class_name": c.name, "geometry": c.to_geojson(), "area": c.area,
             "source_path": str(plan.path.resolve()), "source_sha256": plan.sha256, "imported_at": now}
            for c in plan.classes]
    with store.transaction() as txn:
        txn.add_table("annotations", pa.Table.from_pylist(rows, schema=ANNOTATIONS_SCHEMA))
        txn.add_table("tile_annotations", overlaps)
    return ImportedAnnotations(plan.path, plan.slide.slide_id, tuple((c.name, c.area) for c in plan.classes),
                               n_tilings, overlaps.num_rows, plan.skipped)


def import_annotations(store: Store, paths: list[str | Path], *, slide: str | None = None) -> AnnotationsReport:
    """Import QuPath GeoJSON annotation files: one commit per slide, replacing that slide's earlier import.

    Files go to the slide whose file stem they carry (QuPath's export name), or all to ``slide``
    (an id, id prefix, path, file name or stem), which then takes exactly one file. A file that is
    not QuPath GeoJSON, names no slide of the store, or reaches beyond its slide is reported in
    ``failed`` with a one-line message and nothing of it is written; the other files are imported.
    """
    files, missing = annotation_files(paths)
    if not files and not missing:
        raise AnnotationError(f"no .geojson files under {', '.join(map(str, paths))}; export annotations from "
                              "QuPath with File > Export objects as GeoJSON and pass those files or their folder")
    if slide is not None and len(files) + len(missing) != 1:
        raise AnnotationError(f"--slide {slide} takes one annotation file, got {len(files) + len(missing)}; import "
                              "the others by file stem (QuPath names exports after the image) or one by one")
    snap = store.snapshot()
    slides = snap.slides()
    tilings = {t.id: t for t in snap.tilings()}
    failed = [RefusedAnnotations(Path(m), f"{m}: no such file, folder or .geojson glob match; check the path")
              for m in missing]
    plans: list[_Plan] = []
    owner: dict[str, Path] = {}
    for path in files:
        try:
            plan = _plan(path, slides, slide)
            sid = plan.slide.slide_id
            if sid in owner:
                raise AnnotationError(f"{path}: slide {sid} already takes its annotations from {owner[sid]} in this "
                                      "import, and each import replaces a slide's annotations; merge them in QuPath "
                                      "(one export per image) or import one")
            owner[sid] = path
            plans.append(plan)
        except AnnotationError as err:
            failed.append(RefusedAnnotations(path, str(err)))
    imported = [_commit(store, snap, plan, tilings) for plan in plans]
    return AnnotationsReport(tuple(imported), tuple(failed))


QC_MEASUREMENTS = ("tile_index", "tissue_fraction", *TileQuality.COLUMNS)
"""Tile columns ``fs extract --geojson`` writes as each tile object's measurements (where not null)."""


def write_qc_geojson(path: str | Path, mask: TissueMask, slide: Slide, tiles: pa.Table, edge: int) -> Path:
    """The slide's tissue contours (class Tissue) and tile grid (``tile`` objects) as GeoJSON QuPath imports.

    ``tiles`` is the slide's tiles table as committed and ``edge`` a tile's level-0 edge; measure
    columns that are null for every tile (tiles never read) are left out.
    """
    measurements = {name: tiles.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
                    for name in QC_MEASUREMENTS if name in tiles.column_names and tiles.column(name).null_count
                    < tiles.num_rows}
    features = tissue_features(mask_polygons(mask, slide.width, slide.height))
    features += tile_features(tiles.column("x").to_numpy(), tiles.column("y").to_numpy(), edge, measurements)
    return write_geojson(path, features)


def class_predicate(store: Store | Snapshot, spec: str) -> str:
    """The SQL predicate over tiles ``t`` that ``fs search --in-class CLASS[:MIN]`` adds to ``--where``.

    It keeps tiles whose overlap with annotation class ``CLASS`` is at least ``MIN`` (a fraction
    in (0, 1]; without it, any overlap). A class name may itself hold colons (QuPath's derived
    classes, "Tumor: Positive"): only a number after the last colon is read as ``MIN``.
    """
    name, _, tail = spec.rpartition(":")
    try:
        minimum = float(tail) if name else None
    except ValueError:
        minimum = None
    if minimum is None:
        name = spec
    elif not 0.0 < minimum <= 1.0:
        raise InvalidArgumentError(f"--in-class {spec}: the overlap after ':' is a fraction of the tile in (0, 1], "
                                   f"e.g. {name}:0.5")
    name = name.strip()
    snap = store.snapshot() if isinstance(store, Store) else store
    classes = snap.sql("SELECT DISTINCT class_name FROM tile_annotations ORDER BY class_name")
    known = classes.column("class_name").to_pylist()
    if name not in known:
        listed = ", ".join(known) if known else "none yet (import QuPath exports with fs annotations import)"
        raise InvalidArgumentError(f"--in-class {spec}: no tile overlaps an annotation of class {name!r}; classes "
                                   f"with tiles: {listed}")
    quoted = "'" + name.replace("'", "''") + "'"
    bound = f" AND overlap >= {minimum!r}" if minimum is not None else ""
    return f"t.tile_id IN (SELECT tile_id FROM tile_annotations WHERE class_name = {quoted}{bound})"
