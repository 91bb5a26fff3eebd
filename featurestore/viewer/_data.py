"""What the viewer reads from the store: cohort rows, one slide, its tiles, tile pixels and searches.

Every read goes through the store's public API on the newest snapshot: request values are ids looked up
with bound parameters (``?``), and the user's predicate only ever reaches ``Snapshot.sql``, the
read-only gate. Slide files are opened by the paths the store recorded, never by a path from a request.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from featurestore.schemas import FsError, InvalidArgumentError, NotFoundError, SqlError
from featurestore.store import Snapshot, Store

QUALITY = ("tissue_fraction", "sharpness", "pen_fraction", "background_fraction")
"""Per-tile scores the slide page can colour tiles by; a store written before a column existed lacks it."""

_TILE_ID = re.compile(r"[0-9]{1,19}")
_EMBEDDED_FIRST = ("ORDER BY tiling_id NOT IN (SELECT e.tiling_id FROM bags b JOIN embedding_sets e USING (set_id) "
                   "WHERE b.slide_id = ?), tiling_id")
"""A slide's tilings with embeddings before those that only cache pixels: the slide page opens on the first."""


class PredicateError(FsError, ValueError):
    """A user's SQL predicate that the store's gate refused or DuckDB could not run."""


@dataclass(frozen=True)
class SlideRow:
    """One registered slide, as the store records it."""

    slide_id: str
    path: str
    vendor: str
    width: int
    height: int
    mpp_x: float
    mpp_y: float

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def file_present(self) -> bool:
        return _exists(self.path)


@dataclass(frozen=True)
class TileRow:
    """One tile looked up by id: its slide, tiling and level-0 footprint."""

    tile_id: int
    slide_id: str
    tiling_id: str
    tile_index: int
    x: int
    y: int
    footprint: int


def parse_tile_id(text: str) -> int:
    """A tile id from a request (63-bit, so it travels as decimal text: JSON numbers stop at 2**53)."""
    if not _TILE_ID.fullmatch(text) or int(text) >= 2**63:
        raise InvalidArgumentError(f"tile id {text[:40]!r} is not a tile id; tile ids are decimal integers below "
                                   "2**63, as the tiles endpoints return them")
    return int(text)


def jsonable(table: pa.Table) -> list[dict[str, Any]]:
    """Rows for JSON: tile ids as text (they overflow a JavaScript number), floats rounded, NaN as null."""
    rows = table.to_pylist()
    for row in rows:
        for key, value in row.items():
            if key == "tile_id" and value is not None:
                row[key] = str(value)
            elif isinstance(value, float):
                row[key] = None if value != value else round(value, 6)
    return rows


class ViewerData:
    """The store as the viewer reads it: always the newest snapshot, never a write."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._slides: tuple[int, dict[str, SlideRow]] = (-1, {})

    def snapshot(self) -> Snapshot:
        # Store.snapshot swaps its cached snapshot when the log moves; one thread at a time does so, and the
        # first query (which builds the SQL views) runs under the lock so request threads never race it.
        with self._lock:
            snap = self.store.snapshot()
            snap.sql("SELECT 1")
            return snap

    # --- cohort ----------------------------------------------------------------------------------

    def matching_slides(self, snap: Snapshot, where: str | None) -> set[str] | None:
        """Slide ids satisfying ``where`` over ``slides s`` and ``labels l``; None without a predicate."""
        if not where or not where.strip():
            return None
        try:
            table = snap.sql(f"SELECT s.slide_id FROM slides s LEFT JOIN labels l USING (slide_id) WHERE ({where})")
        except SqlError as err:
            raise PredicateError(f"predicate {where!r}: {str(err).splitlines()[0]}; write SQL over slides s and "
                                 "labels l, e.g. l.label = 1 AND s.mpp_x < 0.3") from err
        return set(table.column("slide_id").to_pylist())

    def cohort(self, where: str | None) -> dict[str, Any]:
        """Slides with labels, tile counts, embedding sets and failures; ``where`` filters them."""
        snap = self.snapshot()
        keep = self.matching_slides(snap, where)
        slides = snap.sql("SELECT slide_id, path, vendor, width, height, mpp_x FROM slides ORDER BY path").to_pylist()
        labels = {r.pop("slide_id"): r for r in snap.sql("SELECT * EXCLUDE (commit_id) FROM labels").to_pylist()}
        tiles = {r["slide_id"]: r["n"] for r in snap.sql(
            "SELECT slide_id, sum(n_tiles)::BIGINT AS n FROM slide_tilings GROUP BY slide_id").to_pylist()}
        names = {es.id: view for view, es in snap.view_names().items()}
        sets: dict[str, list[str]] = {}
        for r in snap.sql("SELECT slide_id, set_id FROM bags ORDER BY set_id").to_pylist():
            if r["set_id"] in names:
                sets.setdefault(r["slide_id"], []).append(names[r["set_id"]])
        failures = snap.sql("SELECT slide_id, slide_path, stage, message FROM failures ORDER BY \"at\"").to_pylist()
        failed: dict[str, list[str]] = {}
        for f in failures:
            if f["slide_id"]:
                failed.setdefault(f["slide_id"], []).append(f"{f['stage']}: {f['message']}")
        label_columns = sorted({c for row in labels.values() for c in row})
        rows = []
        for s in slides:
            if keep is not None and s["slide_id"] not in keep:
                continue
            rows.append({**s, "name": Path(s["path"]).name, "file_present": _exists(s["path"]),
                         "labels": labels.get(s["slide_id"], {}), "tiles": tiles.get(s["slide_id"], 0),
                         "embedding_sets": sets.get(s["slide_id"], []), "failures": failed.get(s["slide_id"], [])})
        known = {s["slide_id"] for s in slides}
        unregistered = [{"path": f["slide_path"], "stage": f["stage"], "message": f["message"]}
                        for f in failures if f["slide_id"] not in known]
        return {"version": snap.version, "label_columns": label_columns, "slides": rows, "total": len(slides),
                "unregistered_failures": unregistered}

    # --- one slide -------------------------------------------------------------------------------

    def slide(self, snap: Snapshot, slide_id: str) -> SlideRow:
        """A slide by id; remembered for the snapshot's version, since every deep zoom tile asks for it."""
        version, known = self._slides
        if version == snap.version and slide_id in known:
            return known[slide_id]
        rows = snap.sql("SELECT slide_id, path, vendor, width, height, mpp_x, mpp_y FROM slides WHERE slide_id = ?",
                        [slide_id]).to_pylist()
        if not rows:
            raise NotFoundError(f"slide {slide_id[:64]!r} is not in the store; pick a slide from the cohort page")
        found = SlideRow(**rows[0])
        with self._lock:
            if self._slides[0] != snap.version:
                self._slides = (snap.version, {})
            self._slides[1][slide_id] = found
        return found

    def slide_info(self, slide_id: str) -> dict[str, Any]:
        snap = self.snapshot()
        slide = self.slide(snap, slide_id)
        tilings = {t.id: t for t in snap.tilings()}
        tiled = snap.sql(f"SELECT tiling_id, n_tiles, pixels FROM slide_tilings WHERE slide_id = ? {_EMBEDDED_FIRST}",
                         [slide_id, slide_id]).to_pylist()
        bags = set(snap.sql("SELECT set_id FROM bags WHERE slide_id = ?", [slide_id]).column("set_id").to_pylist())
        labels = snap.sql("SELECT * EXCLUDE (slide_id, commit_id) FROM labels WHERE slide_id = ?",
                          [slide_id]).to_pylist()
        failures = snap.sql("SELECT stage, message FROM failures WHERE slide_id = ? ORDER BY \"at\"", [slide_id])
        return {
            "slide_id": slide.slide_id, "name": slide.name, "vendor": slide.vendor, "width": slide.width,
            "height": slide.height, "mpp": slide.mpp_x, "file_present": slide.file_present,
            "labels": labels[0] if labels else {},
            "tilings": [{"tiling_id": t["tiling_id"], "n_tiles": t["n_tiles"], "pixels": t["pixels"],
                         "tile_size": spec.tile_size, "target_mpp": spec.target_mpp,
                         "footprint": footprint(spec.tile_size, spec.target_mpp, slide.mpp_x)}
                        for t in tiled if (spec := tilings.get(t["tiling_id"])) is not None],
            "sets": [{"model": view, "encoder": es.encoder_name, "set_id": es.id, "tiling_id": es.tiling_id}
                     for view, es in snap.view_names().items() if es.id in bags],
            "quality": self.quality_columns(snap),
            "annotations": self.annotation_classes(snap, slide_id),
            "failures": failures.to_pylist(),
        }

    def annotation_classes(self, snap: Snapshot, slide_id: str) -> list[str]:
        """Classes of the slide's imported annotations with a tile overlap (none in a store without the table)."""
        if not self._has_table(snap, "tile_annotations"):
            return []
        return snap.sql("SELECT DISTINCT class_name FROM tile_annotations WHERE slide_id = ? ORDER BY class_name",
                        [slide_id]).column("class_name").to_pylist()

    def annotation_overlap(self, slide_id: str, tiling_id: str, class_name: str) -> dict[int, float]:
        """tile_index → the fraction of the tile inside ``class_name`` (tiles outside it are absent)."""
        snap = self.snapshot()
        if class_name not in self.annotation_classes(snap, slide_id):
            raise NotFoundError(f"slide has no annotation class {class_name[:60]!r}; import one with fs annotations "
                                "import, or choose one the slide page lists")
        rows = snap.sql("SELECT tile_index, overlap FROM tile_annotations WHERE slide_id = ? AND tiling_id = ? "
                        "AND class_name = ?", [slide_id, tiling_id, class_name]).to_pylist()
        return {r["tile_index"]: r["overlap"] for r in rows}

    @staticmethod
    def _has_table(snap: Snapshot, name: str) -> bool:
        return bool(snap.sql("SELECT count(*) AS n FROM duckdb_views() WHERE view_name = ?", [name])
                    .column("n")[0].as_py())

    def quality_columns(self, snap: Snapshot) -> list[str]:
        present = set(snap.sql("SELECT * FROM tiles LIMIT 0").column_names)
        return [c for c in QUALITY if c in present]

    def tiles(self, slide_id: str, tiling_id: str | None) -> tuple[SlideRow, str, int, pa.Table]:
        """The slide, its tiling (the only one, or ``tiling_id``), the tiles' level-0 edge and the tiles
        (tile_id, tile_index, x, y and the quality columns the store has) in tile_index order."""
        snap = self.snapshot()
        slide = self.slide(snap, slide_id)
        tiled = snap.sql(f"SELECT tiling_id FROM slide_tilings WHERE slide_id = ? {_EMBEDDED_FIRST}",
                         [slide_id, slide_id]).column("tiling_id").to_pylist()
        if not tiled:
            raise NotFoundError(f"slide {slide.name} has no tiles; run fs extract on it")
        tiling_id = tiling_id or tiled[0]
        if tiling_id not in tiled:
            raise NotFoundError(f"slide {slide.name} has no tiling {tiling_id[:40]!r}; choose one of "
                                f"{', '.join(tiled)}")
        spec = next(t for t in snap.tilings() if t.id == tiling_id)
        columns = ", ".join(["tile_id", "tile_index", "x", "y", *self.quality_columns(snap)])
        table = snap.sql(f"SELECT {columns} FROM tiles WHERE slide_id = ? AND tiling_id = ? ORDER BY tile_index",
                         [slide_id, tiling_id])
        return slide, tiling_id, footprint(spec.tile_size, spec.target_mpp, slide.mpp_x), table

    def tile(self, tile_id: int) -> TileRow:
        snap = self.snapshot()
        rows = snap.sql("SELECT t.tile_id, t.slide_id, t.tiling_id, t.tile_index, t.x, t.y, s.mpp_x FROM tiles t "
                        "JOIN slides s USING (slide_id) WHERE t.tile_id = ?", [tile_id]).to_pylist()
        if not rows:
            raise NotFoundError(f"tile {tile_id} is not in the store; take tile ids from a slide's tiles")
        r = rows[0]
        spec = next(t for t in snap.tilings() if t.id == r["tiling_id"])
        return TileRow(r["tile_id"], r["slide_id"], r["tiling_id"], r["tile_index"], r["x"], r["y"],
                       footprint(spec.tile_size, spec.target_mpp, r["mpp_x"]))

    def tile_pixels(self, tile: TileRow) -> np.ndarray | str:
        """The tile's RGB pixels from the pixel cache, else from the slide file; the reason when neither has them."""
        from featurestore.index import tile_pixels

        return tile_pixels(self.snapshot(), tile.tiling_id, [tile.tile_id]).get(tile.tile_id, "tile not found")


def footprint(tile_size: int, target_mpp: float, slide_mpp: float) -> int:
    """A tile's edge in level-0 pixels of a slide."""
    return max(1, round(tile_size * target_mpp / slide_mpp))


def _exists(path: str) -> bool:
    """Whether a slide's recorded file (or DICOM folder) is still there."""
    return Path(path).exists()
