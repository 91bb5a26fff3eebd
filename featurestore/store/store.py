"""The store: typed records in Parquet, dense arrays in Zarr, SQL through DuckDB.

Writes go through ``Transaction`` (one atomic commit per slide). Reads resolve
"which commit holds the latest version of X" through the DuckDB views, then open
only the arrays they need, so reading one slide's bag never touches the others.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from featurestore.store import _arrays, _sql
from featurestore.store._commit import Transaction
from featurestore.store._labels import LabelKey, read_labels
from featurestore.store._layout import COMMITS, GENESIS, STAGING, check_marker, write_marker
from schemas import (
    FREE_TABLES,
    TABLES,
    Bag,
    EmbeddingSet,
    EncoderSpec,
    Failure,
    InvalidRecordError,
    ReadOnlyError,
    Run,
    Slide,
    SlideTiling,
    StoreExistsError,
    TilingSpec,
    UnknownEmbeddingSetError,
    from_row,
    stored_schema,
    tile_id,
)
from schemas import Tile as TileRecord


def tiles_table(slide_id: str, tiling_id: str, x: np.ndarray, y: np.ndarray, level: int, read_size: int,
                tissue_fraction: np.ndarray) -> pa.Table:
    """Build a slide's tiles table column-wise (a slide can have 100k tiles; no per-row records)."""
    n = len(x)
    ids = np.fromiter((tile_id(slide_id, tiling_id, i) for i in range(n)), dtype=np.int64, count=n)
    schema = stored_schema(TileRecord).remove(stored_schema(TileRecord).get_field_index("commit_id"))
    return pa.table({
        "slide_id": pa.array([slide_id] * n, pa.string()),
        "tiling_id": pa.array([tiling_id] * n, pa.string()),
        "tile_index": np.arange(n, dtype=np.int64),
        "x": np.asarray(x, np.int64), "y": np.asarray(y, np.int64),
        "level": np.full(n, level, np.int64), "read_size": np.full(n, read_size, np.int64),
        "tissue_fraction": np.asarray(tissue_fraction, np.float64),
        "tile_id": ids,
    }, schema=schema)


@dataclass(frozen=True)
class TiledPixels:
    """Tiles and their pixels on a further tiling of the same slide (e.g. a lower magnification)."""

    tiling: TilingSpec
    tiles: pa.Table
    pixels: np.ndarray


@dataclass(frozen=True)
class SlideCommit:
    """Everything extraction produces for one slide and one tiling, committed as one unit.

    ``tiles`` may be None when the slide was already tiled with this tiling (adding a model
    to an existing store); ``embeddings`` maps each encoder to an (n, dim) or (n, views, dim) array.
    """

    slide: Slide
    tiling: TilingSpec
    tiles: pa.Table | None
    embeddings: dict[EncoderSpec, np.ndarray] = field(default_factory=dict)
    pixels: np.ndarray | None = None
    dtype: str = "float16"
    extra: tuple[TiledPixels, ...] = ()


@dataclass(frozen=True)
class StoreInfo:
    """What ``fs info`` prints."""

    path: Path
    slides: int
    tiles: int
    encoders: list[str]
    embedding_sets: list[tuple[str, str, int, int]]
    failures: int
    labelled_slides: int
    bytes_on_disk: int
    staging: int
    tilings: list[tuple[str, str, int, int, int]] = field(default_factory=list)
    """(tiling_id, "224 px @ 0.5 µm/px", slides, tiles, slides with cached pixels) per tiling."""


_VIEW_SAFE = re.compile(r"[^a-z0-9_]")


class Store:
    """A feature store directory. Use ``Store.create`` or ``Store.open``; both are cheap."""

    def __init__(self, root: Path, *, read_only: bool) -> None:
        self.root = Path(root)
        self.read_only = read_only
        self._known_ids: set[str] | None = None
        self._location_cache: tuple[int, dict, dict] | None = None

    @classmethod
    def create(cls, path: str | Path) -> Store:
        root = Path(path)
        if (root / "featurestore.json").exists():
            raise StoreExistsError(f"{root}: a store already exists here; open it instead (fs info {root})")
        if root.exists() and any(root.iterdir()):
            raise StoreExistsError(f"{root}: directory is not empty; choose a new or empty directory")
        (root / COMMITS).mkdir(parents=True, exist_ok=True)
        (root / STAGING).mkdir(exist_ok=True)
        genesis = root / STAGING / GENESIS
        genesis.mkdir()
        for name, cls_ in TABLES.items():
            pq.write_table(stored_schema(cls_).empty_table(), genesis / f"{name}.parquet")
        for name, schema in FREE_TABLES.items():
            pq.write_table(schema.append(pa.field("commit_id", pa.string())).empty_table(),
                           genesis / f"{name}.parquet")
        os.rename(genesis, root / COMMITS / GENESIS)
        write_marker(root)
        return cls(root, read_only=False)

    @classmethod
    def open(cls, path: str | Path, *, read_only: bool = False) -> Store:
        root = Path(path)
        check_marker(root)
        return cls(root, read_only=read_only)

    @classmethod
    def open_or_create(cls, path: str | Path) -> Store:
        root = Path(path)
        return cls.open(root) if (root / "featurestore.json").exists() else cls.create(root)

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.root}: store was opened read-only; open it with read_only=False to write")

    def transaction(self) -> Transaction:
        self._writable()
        return Transaction(self.root)

    # --- SQL ---------------------------------------------------------------------------------

    def sql(self, query: str, params: list | None = None) -> pa.Table:
        """Run one read-only SQL statement (``?`` placeholders bound to ``params``) over the store's views."""
        _sql.check_read_only(query)
        cur = self._con.cursor()
        try:
            _sql.register_embedding_views(cur, query, self._embedding_view_factories())
            return cur.sql(query, params=params or None).to_arrow_table()
        finally:
            cur.close()

    def search(self, model: str, **query) -> pa.Table:
        """Nearest tiles or slides to a query, with labels joined; see ``featurestore.index.search``."""
        from featurestore.index import search

        return search(self, model, **query)

    @cached_property
    def _con(self) -> duckdb.DuckDBPyConnection:
        return _sql.connect(self.root)

    def _query(self, query: str, params: list | None = None) -> pa.Table:
        cur = self._con.cursor()
        try:
            return cur.sql(query, params=params or None).to_arrow_table()
        finally:
            cur.close()

    def _locations(self) -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], tuple[str, bool]]]:
        """Where each bag and each slide's tiles live, cached until a commit is added.

        Commits are only ever added, so the number of entries in ``commits/`` is a complete
        version number; listing it costs microseconds, a DuckDB query milliseconds.
        """
        version = len(os.listdir(self.root / COMMITS))
        if self._location_cache is None or self._location_cache[0] != version:
            bags = {(r["set_id"], r["slide_id"]): r["commit_id"]
                    for r in self._query("SELECT set_id, slide_id, commit_id FROM bags").to_pylist()}
            tiled = {(r["slide_id"], r["tiling_id"]): (r["commit_id"], r["pixels"])
                     for r in self._query("SELECT slide_id, tiling_id, commit_id, pixels FROM slide_tilings"
                                          ).to_pylist()}
            self._location_cache = (version, bags, tiled)
        return self._location_cache[1], self._location_cache[2]

    # --- catalogue ---------------------------------------------------------------------------

    def _records(self, table: str, cls: type) -> list:
        return [from_row(cls, row) for row in self._query(f"SELECT * EXCLUDE (commit_id) FROM {table}").to_pylist()]

    def slides(self) -> list[Slide]:
        return self._records("slides", Slide)

    def tilings(self) -> list[TilingSpec]:
        return self._records("tilings", TilingSpec)

    def encoders(self) -> list[EncoderSpec]:
        return self._records("encoders", EncoderSpec)

    def embedding_sets(self) -> list[EmbeddingSet]:
        return sorted(self._records("embedding_sets", EmbeddingSet), key=lambda s: (s.encoder_name, s.id))

    def failures(self) -> list[Failure]:
        return self._records("failures", Failure)

    def runs(self) -> list[Run]:
        return self._records("runs", Run)

    def view_names(self) -> dict[str, EmbeddingSet]:
        """SQL view name of every embedding set: ``emb_<encoder>``, suffixed when one encoder has several sets."""
        sets = self.embedding_sets()
        counts: dict[str, int] = {}
        for s in sets:
            counts[s.encoder_name] = counts.get(s.encoder_name, 0) + 1
        names = {}
        for s in sets:
            base = "emb_" + _VIEW_SAFE.sub("_", s.encoder_name.lower())
            names[base if counts[s.encoder_name] == 1 else f"{base}_{s.id[:8]}"] = s
        return names

    def embedding_set(self, model: str) -> EmbeddingSet:
        """Resolve an embedding set by encoder name, view name or set id (prefix)."""
        names = self.view_names()
        matches = [s for v, s in names.items()
                   if model in (s.encoder_name, v, v.removeprefix("emb_")) or s.id.startswith(model)]
        if len(matches) == 1:
            return matches[0]
        choices = ", ".join(f"{v} ({s.encoder_name}, set {s.id})" for v, s in names.items()) or "none yet"
        why = "is ambiguous" if matches else "matches no embedding set"
        raise UnknownEmbeddingSetError(f"{self.root}: model {model!r} {why}; choose one of: {choices}")

    def progress(self, tiling_id: str) -> dict[str, frozenset[str]]:
        """Resume state in one query: every slide tiled with ``tiling_id`` → ids of the sets holding its bag.

        Extraction takes this snapshot once per run (not once per slide), because each query reads
        every commit's small tables and a cohort has thousands of commits. Set ids cover encoder,
        dtype and views, so a float32 or multi-view request is not mistaken for finished work.
        """
        rows = self._query(
            "SELECT st.slide_id, list(e.set_id) FILTER (WHERE e.set_id IS NOT NULL) AS sets "
            "FROM slide_tilings st LEFT JOIN bags b ON b.slide_id = st.slide_id "
            "LEFT JOIN embedding_sets e ON e.set_id = b.set_id AND e.tiling_id = st.tiling_id "
            "WHERE st.tiling_id = ? GROUP BY st.slide_id", [tiling_id]).to_pylist()
        return {r["slide_id"]: frozenset(r["sets"] or ()) for r in rows}

    # --- writing -----------------------------------------------------------------------------

    def register(self, *records: Slide | TilingSpec | EncoderSpec | EmbeddingSet | Run | Failure) -> None:
        """Commit catalogue records (idempotent: re-registering the same record is harmless)."""
        with self.transaction() as txn:
            txn.add(*records)

    def commit_slide(self, item: SlideCommit) -> str:
        """Write one slide's tiles, embeddings and pixels as a single atomic commit; return its id."""
        self._writable()
        n = self._n_tiles(item)
        sets = []
        for spec, emb in item.embeddings.items():
            if emb.shape[0] != n or emb.shape[-1] != spec.embed_dim:
                raise InvalidRecordError(f"{item.slide.path}: {spec.name} embeddings have shape {emb.shape}; "
                                         f"expected ({n}, ..., {spec.embed_dim}) to match the tiles")
            views = emb.shape[1] if emb.ndim == 3 else 1
            sets.append((EmbeddingSet(item.tiling.id, spec.id, spec.name, spec.embed_dim, item.dtype, views), emb))
        layers = [TiledPixels(item.tiling, item.tiles, item.pixels)] if item.tiles is not None else []
        layers += item.extra
        for layer in layers:
            if layer.pixels is not None and layer.pixels.shape[0] != layer.tiles.num_rows:
                raise InvalidRecordError(f"{item.slide.path}: {layer.pixels.shape[0]} tile images for "
                                         f"{layer.tiles.num_rows} tiles of tiling {layer.tiling.id}")
        with self.transaction() as txn:
            txn.add(item.slide, *self._unknown([item.tiling, *(x.tiling for x in item.extra), *item.embeddings,
                                                *(s for s, _ in sets)]))
            if layers:
                txn.add_table("tiles", pa.concat_tables([x.tiles for x in layers]))
            for layer in layers:
                txn.add(SlideTiling(item.slide.slide_id, layer.tiling.id, layer.tiles.num_rows,
                                    layer.pixels is not None))
                if layer.pixels is not None:
                    txn.write_pixels(layer.tiling.id, layer.pixels)
            for es, emb in sets:
                txn.write_embeddings(es.id, emb.astype(es.dtype, copy=False))
                txn.add(Bag(es.id, item.slide.slide_id, n))
            return txn.commit_id

    def _unknown(self, records: list[TilingSpec | EncoderSpec | EmbeddingSet]) -> list:
        """Catalogue records not yet in the store, so each slide commit does not repeat them."""
        if self._known_ids is None:
            self._known_ids = set(self._query(
                "SELECT tiling_id FROM tilings UNION ALL SELECT encoder_id FROM encoders "
                "UNION ALL SELECT set_id FROM embedding_sets").column(0).to_pylist())
        new = [r for r in records if r.id not in self._known_ids]
        self._known_ids.update(r.id for r in new)
        return new

    def _n_tiles(self, item: SlideCommit) -> int:
        if item.tiles is not None:
            if item.tiles.num_rows == 0:
                raise InvalidRecordError(f"{item.slide.path}: no tiles to commit; record a failure instead")
            return item.tiles.num_rows
        rows = self._query("SELECT n_tiles FROM slide_tilings WHERE slide_id = ? AND tiling_id = ?",
                           [item.slide.slide_id, item.tiling.id]).column("n_tiles").to_pylist()
        if not rows:
            raise InvalidRecordError(f"{item.slide.path}: not yet tiled with tiling {item.tiling.id}; "
                                     "commit its tiles first")
        return rows[0]

    def import_labels(self, csv_path: str | Path, key: LabelKey = "filename") -> int:
        """Store a labels CSV joined to slides; nothing is written unless every row matches. Returns rows."""
        self._writable()
        labels = read_labels(Path(csv_path), key, self._query("SELECT slide_id, path FROM slides"))
        with self.transaction() as txn:
            txn.add_table("labels", labels)
        return labels.num_rows

    def vacuum(self, older_than_s: float = 6 * 3600) -> int:
        """Delete staging directories of writers that died (older than ``older_than_s``); return how many."""
        self._writable()
        cutoff = time.time() - older_than_s
        stale = [p for p in (self.root / STAGING).iterdir() if p.stat().st_mtime < cutoff]
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        return len(stale)

    # --- reading -----------------------------------------------------------------------------

    def read_tiles(self, slide_id: str, tiling_id: str) -> pa.Table:
        """One slide's tiles in tile_index order, read from the one Parquet file that holds them."""
        commit, _ = self._tiled(slide_id, tiling_id)
        table = pq.read_table(self.root / COMMITS / commit / "tiles.parquet",
                              filters=[("slide_id", "=", slide_id), ("tiling_id", "=", tiling_id)])
        return table.sort_by("tile_index")

    def read_bag(self, es: EmbeddingSet, slide_id: str) -> np.ndarray:
        """One slide's embeddings (n, dim) (or (n, views, dim)); opens only that slide's array."""
        return self.bag_array(es, slide_id)[...]

    def bag_array(self, es: EmbeddingSet, slide_id: str) -> zarr.Array:
        """The lazily-read Zarr array behind a bag, for partial reads."""
        commit = self._locations()[0].get((es.id, slide_id))
        if commit is None:
            raise KeyError(f"{self.root}: slide {slide_id} has no embeddings in set {es.id} ({es.encoder_name})")
        return _arrays.open_array(self.root / COMMITS / commit / "emb" / es.id)

    def read_pixels(self, tiling_id: str, slide_id: str, indices: np.ndarray | None = None) -> np.ndarray:
        commit, pixels = self._tiled(slide_id, tiling_id)
        if not pixels:
            raise KeyError(f"{self.root}: slide {slide_id} has no cached pixels for tiling {tiling_id}; "
                           "extract with --cache-pixels")
        arr = _arrays.open_array(self.root / COMMITS / commit / "pix" / tiling_id)
        return arr[...] if indices is None else arr.get_orthogonal_selection((np.asarray(indices),))

    def _tiled(self, slide_id: str, tiling_id: str) -> tuple[str, bool]:
        found = self._locations()[1].get((slide_id, tiling_id))
        if found is None:
            raise KeyError(f"{self.root}: slide {slide_id} has no tiles for tiling {tiling_id}")
        return found

    def read_by_tile_ids(self, es: EmbeddingSet, tile_ids: list[int] | np.ndarray) -> np.ndarray:
        """Embeddings for arbitrary tile ids, in the order given; reads only the slides involved."""
        wanted = pa.table({"tile_id": pa.array(np.asarray(tile_ids, np.int64)),
                           "pos": pa.array(np.arange(len(tile_ids)))})
        cur = self._con.cursor()
        try:
            cur.register("wanted", wanted)
            hits = cur.sql("SELECT w.pos, t.slide_id, t.tile_index FROM wanted w JOIN tiles t USING (tile_id) "
                           "WHERE t.tiling_id = ? ORDER BY t.slide_id, t.tile_index", params=[es.tiling_id]
                           ).to_arrow_table()
        finally:
            cur.close()
        if hits.num_rows != len(tile_ids):
            found = set(hits.column("pos").to_pylist())
            missing = [int(tile_ids[i]) for i in range(len(tile_ids)) if i not in found][:5]
            raise KeyError(f"{self.root}: tile ids not in embedding set {es.encoder_name}: {missing}")
        out = np.empty((len(tile_ids), *self._row_shape(es)), dtype=es.dtype)
        pos = hits.column("pos").to_numpy()
        slides = hits.column("slide_id").to_numpy(zero_copy_only=False)
        index = hits.column("tile_index").to_numpy()
        for sid in dict.fromkeys(slides):
            sel = slides == sid
            out[pos[sel]] = self.bag_array(es, sid).get_orthogonal_selection((index[sel],))
        return out

    def iter_bags(self, es: EmbeddingSet) -> Iterator[tuple[str, pa.Table, np.ndarray]]:
        """Stream (slide_id, tiles, embeddings) for a whole embedding set, one slide in memory at a time."""
        for slide_id, emb in self._iter_arrays(es):
            yield slide_id, self.read_tiles(slide_id, es.tiling_id), emb

    def _iter_arrays(self, es: EmbeddingSet) -> Iterator[tuple[str, np.ndarray]]:
        bags, _ = self._locations()
        for slide_id in sorted(sid for set_id, sid in bags if set_id == es.id):
            yield slide_id, _arrays.open_array(self.root / COMMITS / bags[(es.id, slide_id)] / "emb" / es.id)[...]

    def _row_shape(self, es: EmbeddingSet) -> tuple[int, ...]:
        return (es.embed_dim,) if es.views == 1 else (es.views, es.embed_dim)

    def _embedding_view_factories(self) -> dict[str, tuple[_sql.StreamFactory, _sql.StreamFactory]]:
        return {view: (lambda es=es: self._embedding_reader(es), lambda es=es: self._slide_mean_reader(es))
                for view, es in self.view_names().items()}

    def _embedding_reader(self, es: EmbeddingSet) -> pa.RecordBatchReader:
        schema = pa.schema([("slide_id", pa.string()), ("tile_index", pa.int64()), ("tile_id", pa.int64()),
                            ("x", pa.int64()), ("y", pa.int64()),
                            ("embedding", pa.list_(pa.float32(), es.embed_dim))])

        def batches() -> Iterator[pa.RecordBatch]:
            for _, tiles, emb in self.iter_bags(es):
                vectors = (emb[:, 0] if emb.ndim == 3 else emb).astype(np.float32, copy=False)
                flat = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), es.embed_dim)
                yield pa.RecordBatch.from_arrays(
                    [tiles.column("slide_id").combine_chunks(), tiles.column("tile_index").combine_chunks(),
                     tiles.column("tile_id").combine_chunks(), tiles.column("x").combine_chunks(),
                     tiles.column("y").combine_chunks(), flat], schema=schema)

        return _sql.stream(batches(), schema)

    def _slide_mean_reader(self, es: EmbeddingSet) -> pa.RecordBatchReader:
        """One row per slide with tiles: their count and the float32 mean of their embeddings (view 0)."""
        schema = pa.schema([("slide_id", pa.string()), ("n_tiles", pa.int64()),
                            ("embedding", pa.list_(pa.float32(), es.embed_dim))])

        def batches() -> Iterator[pa.RecordBatch]:
            for slide_id, emb in self._iter_arrays(es):
                if not len(emb):
                    continue
                mean = (emb[:, 0] if emb.ndim == 3 else emb).mean(0, dtype=np.float64).astype(np.float32)
                yield pa.RecordBatch.from_arrays(
                    [pa.array([slide_id]), pa.array([len(emb)], pa.int64()),
                     pa.FixedSizeListArray.from_arrays(pa.array(mean), es.embed_dim)], schema=schema)

        return _sql.stream(batches(), schema)

    # --- summary -----------------------------------------------------------------------------

    def info(self) -> StoreInfo:
        counts = self._query(
            "SELECT (SELECT count(*) FROM slides) AS slides, (SELECT count(*) FROM tiles) AS tiles, "
            "(SELECT count(*) FROM failures) AS failures, (SELECT count(*) FROM labels) AS labelled").to_pylist()[0]
        sets = []
        bag_counts = {r["set_id"]: (r["slides"], r["tiles"]) for r in self._query(
            "SELECT set_id, count(*) AS slides, sum(n_tiles) AS tiles FROM bags GROUP BY set_id").to_pylist()}
        for view, es in self.view_names().items():
            n_slides, n_tiles = bag_counts.get(es.id, (0, 0))
            sets.append((view, f"{es.encoder_name} ({es.embed_dim}-d {es.dtype})", n_slides, int(n_tiles or 0)))
        tilings = [(r["tiling_id"], f"{r['tile_size']} px @ {r['target_mpp']:g} µm/px", r["slides"],
                    int(r["tiles"] or 0), r["with_pixels"]) for r in self._query(
            "SELECT t.tiling_id, t.tile_size, t.target_mpp, count(st.slide_id) AS slides, sum(st.n_tiles) AS tiles, "
            "count(*) FILTER (WHERE st.pixels) AS with_pixels FROM tilings t LEFT JOIN slide_tilings st "
            "USING (tiling_id) GROUP BY ALL ORDER BY t.target_mpp, t.tile_size").to_pylist()]
        size = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
        return StoreInfo(self.root, counts["slides"], counts["tiles"], sorted({e.name for e in self.encoders()}),
                         sets, counts["failures"], counts["labelled"], size,
                         sum(1 for _ in (self.root / STAGING).iterdir()), tilings)
