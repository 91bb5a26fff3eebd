"""A pinned, read-only view of the store at one log version.

Every read API lives here. ``Store`` hands out the newest snapshot (``store.snapshot()``) and its
own read methods use a fresh one per call; a reader that needs several calls to agree — a
training run, an index build, a search — keeps one ``Snapshot`` for all of them. SQL table views,
the ``emb_<model>`` views and direct bag reads all resolve through the same version, and every
file is checked against its commit's manifest before it is trusted.
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featurestore.schemas import (
    BagNotFoundError,
    EmbeddingSet,
    EncoderSpec,
    Failure,
    InvalidArgumentError,
    MissingDependencyError,
    PixelsNotCachedError,
    Run,
    Slide,
    SqlError,
    StoreDamageError,
    Tile,
    TileIdsNotFoundError,
    TilesNotFoundError,
    TilingSpec,
    UnknownEmbeddingSetError,
    from_row,
    stored_schema,
)
from featurestore.store import _arrays, _manifest, _sql
from featurestore.store._layout import COMMITS, STAGING
from featurestore.store._snapshot import State

if TYPE_CHECKING:
    import pandas as pd
    import zarr

_VIEW_SAFE = re.compile(r"[^a-z0-9_]")

_TILE_FIELDS = stored_schema(Tile).remove(stored_schema(Tile).get_field_index("commit_id"))
TILE_COLUMNS = ("slide_id", "tile_index", "tile_id", "x", "y")
"""The tile columns ``Snapshot.tiles`` returns unless asked for others."""


@dataclass(frozen=True)
class TilingInfo:
    """One tiling of the store: its geometry and how many slides and tiles use it."""

    tiling_id: str
    tile_size: int
    target_mpp: float
    slides: int
    tiles: int
    slides_with_pixels: int

    @property
    def description(self) -> str:
        return f"{self.tile_size} px @ {self.target_mpp:g} µm/px"


@dataclass(frozen=True)
class EmbeddingSetInfo:
    """One embedding set: its SQL view, encoder and how many slides and tiles it holds."""

    view: str
    set_id: str
    encoder_name: str
    embed_dim: int
    dtype: str
    slides: int
    tiles: int

    @property
    def description(self) -> str:
        return f"{self.encoder_name} ({self.embed_dim}-d {self.dtype})"


@dataclass(frozen=True)
class StoreInfo:
    """What a store holds at one version (``fs info``, and the ``repr`` of a store or snapshot)."""

    path: Path
    version: int
    slides: int
    tiles: int
    labelled_slides: int
    failures: int
    encoders: tuple[str, ...]
    tilings: tuple[TilingInfo, ...]
    embedding_sets: tuple[EmbeddingSetInfo, ...]
    bytes_on_disk: int
    """Bytes of the live commits, as their log entries recorded them (no directory walk)."""
    staging: int
    """Unfinished transactions under ``staging/``."""
    commits_since_checkpoint: int
    damaged: tuple[str, ...]
    """One ``path: problem`` line per commit left out of reads because its table files are damaged."""

    def summary(self) -> str:
        """A few lines for a notebook: the counts, then one line per embedding set."""
        n_sets = len(self.embedding_sets)
        lines = [f"version {self.version}: {self.slides:,} slides, {self.tiles:,} tiles, "
                 f"{self.labelled_slides:,} labelled, {n_sets} embedding set{'' if n_sets == 1 else 's'}"]
        lines += [f"  {s.view}: {s.description}, {s.slides:,} slides, {s.tiles:,} tiles" for s in self.embedding_sets]
        if self.damaged:
            lines.append(f"  {len(self.damaged)} damaged commits left out of reads (fs verify)")
        return "\n".join(lines)


class Snapshot:
    """The store as of log version ``version``; cheap to create, safe to share between threads."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.root = state.root
        self._manifests: dict[str, dict[str, tuple[int, str]]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Snapshot({str(self.root)!r}) at {self.info().summary()}"

    def __getstate__(self) -> dict:
        # DuckDB connections do not pickle; a data-loader worker re-opens its own over the same files.
        return {"state": self.state}

    def __setstate__(self, d: dict) -> None:
        self.__init__(d["state"])

    @property
    def version(self) -> int:
        return self.state.version

    # --- SQL ---------------------------------------------------------------------------------

    @cached_property
    def _con(self) -> duckdb.DuckDBPyConnection:
        """Table views, then the embedding views (which need the embedding sets, read through the former)."""
        con = self._plain_con
        for view, es in self.view_names().items():
            _sql.add_embedding_views(con, view, es, self._rows_reader(es), self._mean_reader(es))
        _sql.lock(con)
        return con

    @overload
    def sql(self, query: str, params: Sequence | dict | None = None, *,
            pandas: Literal[False] = False) -> pa.Table: ...

    @overload
    def sql(self, query: str, params: Sequence | dict | None = None, *, pandas: Literal[True]) -> pd.DataFrame: ...

    def sql(self, query: str, params: Sequence | dict | None = None, *,
            pandas: bool = False) -> pa.Table | pd.DataFrame:
        """Run one read-only SQL statement over this snapshot: a pyarrow Table, or a pandas DataFrame with ``pandas``.

        ``?`` placeholders bind to a list ``params`` (``$name`` ones to a dict). Rows come in a defined
        order only with ``ORDER BY``. A query DuckDB cannot run raises ``SqlError`` with DuckDB's message.
        """
        if not isinstance(query, str):
            raise InvalidArgumentError(f"query must be an SQL string, got {type(query).__name__}")
        if params is not None and (isinstance(params, str) or not isinstance(params, Sequence | dict)):
            raise InvalidArgumentError(f"params must be a list (for ? placeholders) or a dict (for $name ones), "
                                       f"got {type(params).__name__}; e.g. sql('... WHERE slide_id = ?', [sid])")
        if pandas:
            _require_pandas()
        try:
            _sql.check_read_only(query)
        except duckdb.Error as err:
            raise SqlError(_one_line(err)) from err
        table = self._query(query, params)
        return table.to_pandas() if pandas else table

    def _query(self, query: str, params: Sequence | dict | None = None) -> pa.Table:
        cur = self._con.cursor()
        try:
            return cur.sql(query, params=params or None).to_arrow_table()
        except duckdb.Error as err:
            cause = _damage_in(err)
            if cause:
                raise StoreDamageError(cause) from err
            raise SqlError(_one_line(err)) from err
        finally:
            cur.close()

    # --- catalogue ---------------------------------------------------------------------------

    @cached_property
    def _plain_con(self) -> duckdb.DuckDBPyConnection:
        """The connection with table views only, before ``_con`` adds the embedding views to it."""
        return _sql.connect(self.state)

    def _tables(self, query: str, params: list | None = None) -> pa.Table:
        """The store's own SQL over the table views: no gate, and no embedding views are defined for it."""
        return _sql.query(self._plain_con, query, params)

    def _records(self, table: str, cls: type) -> list:
        return [from_row(cls, row) for row in self._tables(f"SELECT * EXCLUDE (commit_id) FROM {table}").to_pylist()]

    def slides(self) -> list[Slide]:
        return self._records("slides", Slide)

    def tilings(self) -> list[TilingSpec]:
        return self._records("tilings", TilingSpec)

    def encoders(self) -> list[EncoderSpec]:
        return self._records("encoders", EncoderSpec)

    @cached_property
    def _embedding_sets(self) -> list[EmbeddingSet]:
        return sorted(self._records("embedding_sets", EmbeddingSet), key=lambda s: (s.encoder_name, s.id))

    def embedding_sets(self) -> list[EmbeddingSet]:
        return list(self._embedding_sets)

    def failures(self) -> list[Failure]:
        return self._records("failures", Failure)

    def runs(self) -> list[Run]:
        return self._records("runs", Run)

    def view_names(self) -> dict[str, EmbeddingSet]:
        """SQL view name of every embedding set: ``emb_<encoder>``, suffixed when one encoder has several sets."""
        sets = self._embedding_sets
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
        if not isinstance(model, str) or not model:
            raise InvalidArgumentError(f"model must be an encoder name, view name or set id (a non-empty str), "
                                       f"got {model!r}")
        names = self.view_names()
        matches = [s for v, s in names.items()
                   if model in (s.encoder_name, v, v.removeprefix("emb_")) or s.id.startswith(model)]
        if len(matches) == 1:
            return matches[0]
        choices = ", ".join(f"{v} ({s.encoder_name}, set {s.id})" for v, s in names.items()) or "none yet"
        why = "is ambiguous" if matches else "matches no embedding set"
        raise UnknownEmbeddingSetError(f"{self.root}: model {model!r} {why}; choose one of: {choices}")

    def progress(self, tiling_id: str) -> dict[str, frozenset[str]]:
        """Resume state in one query: every slide tiled with ``tiling_id`` → ids of the sets holding its bag."""
        rows = self._tables(
            "SELECT st.slide_id, list(e.set_id) FILTER (WHERE e.set_id IS NOT NULL) AS sets "
            "FROM slide_tilings st LEFT JOIN bags b ON b.slide_id = st.slide_id "
            "LEFT JOIN embedding_sets e ON e.set_id = b.set_id AND e.tiling_id = st.tiling_id "
            "WHERE st.tiling_id = ? GROUP BY st.slide_id", [tiling_id]).to_pylist()
        return {r["slide_id"]: frozenset(r["sets"] or ()) for r in rows}

    def cached_pixels(self) -> dict[str, frozenset[str]]:
        """slide_id → the tilings whose tile pixels this snapshot caches for it."""
        out: dict[str, set[str]] = {}
        for (slide_id, tiling_id), (_, pixels, _) in self._locations[1].items():
            if pixels:
                out.setdefault(slide_id, set()).add(tiling_id)
        return {sid: frozenset(t) for sid, t in out.items()}

    def n_tiles(self, slide_id: str, tiling_id: str) -> int | None:
        found = self._locations[1].get((slide_id, tiling_id))
        return None if found is None else found[2]

    # --- locations and integrity -------------------------------------------------------------

    @cached_property
    def _locations(self) -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], tuple[str, bool, int]]]:
        """Where each (set, slide) bag and each (slide, tiling) tile table lives in this snapshot."""
        bags = {(r["set_id"], r["slide_id"]): r["commit_id"] for r in
                self._tables("SELECT set_id, slide_id, commit_id FROM bags").to_pylist()}
        tiled = {(r["slide_id"], r["tiling_id"]): (r["commit_id"], r["pixels"], r["n_tiles"]) for r in
                 self._tables("SELECT slide_id, tiling_id, commit_id, pixels, n_tiles FROM slide_tilings").to_pylist()}
        return bags, tiled

    def bag_commits(self, es: EmbeddingSet) -> dict[str, str]:
        """slide_id → the commit holding its bag in ``es``, for every slide of the set, sorted by slide."""
        return dict(sorted((sid, c) for (set_id, sid), c in self._locations[0].items() if set_id == es.id))

    def _manifest(self, commit: str) -> dict[str, tuple[int, str]]:
        found = self._manifests.get(commit)
        if found is None:
            found = _manifest.read(self.root / COMMITS / commit)
            if found is None:
                raise StoreDamageError(f"{self.root / COMMITS / commit / '_manifest.json'}: missing or unreadable, "
                                       "so the commit's files cannot be checked; run `fs verify` for the fix")
            with self._lock:
                self._manifests[commit] = found
        return found

    def _checked(self, commit: str, prefix: str, slide_id: str, what: str) -> Path:
        """The commit's path after checking every file under ``prefix`` is present with its committed size."""
        directory = self.root / COMMITS / commit
        files = self._manifest(commit)
        damage = _manifest.check(directory, files, prefix)
        if damage or not any(rel.startswith(prefix) for rel in files):
            problem = (f"{damage[0].path}: {damage[0].problem}" if damage
                       else f"{directory / prefix}: not in the manifest")
            raise StoreDamageError(f"{problem} — {what} of slide {slide_id} cannot be read; fix: re-extract "
                                   f"the slide, or drop the commit with `fs verify -s {self.root} --drop-damaged`")
        return directory

    # --- reading -----------------------------------------------------------------------------

    def _tiled(self, slide_id: str, tiling_id: str) -> tuple[str, bool, int]:
        found = self._locations[1].get((slide_id, tiling_id))
        if found is None:
            raise TilesNotFoundError(f"{self.root}: slide {slide_id} has no tiles for tiling {tiling_id}; "
                                     "list the tiled slides with SELECT * FROM slide_tilings")
        return found

    def read_tiles(self, tiling_id: str, slide_id: str, columns: list[str] | None = None) -> pa.Table:
        """One slide's tiles in tile_index order, read from the one Parquet file that holds them."""
        commit = self._tiled(slide_id, tiling_id)[0]
        directory = self._checked(commit, "tiles.parquet", slide_id, "the tile table")
        cols = None if columns is None else list(dict.fromkeys(["tile_index", *columns]))
        table = pq.read_table(directory / "tiles.parquet", columns=cols,
                              filters=[("slide_id", "=", slide_id), ("tiling_id", "=", tiling_id)])
        return table.sort_by("tile_index")

    def read_bag(self, es: EmbeddingSet, slide_id: str) -> np.ndarray:
        """One slide's embeddings (n, dim) (or (n, views, dim)); rows follow the tiles' ``tile_index``."""
        return self.bag_array(es, slide_id)[...]

    def bag_array(self, es: EmbeddingSet, slide_id: str) -> zarr.Array:
        """The lazily-read Zarr array behind a bag, for partial reads; its files are checked first."""
        commit = self._locations[0].get((es.id, slide_id))
        if commit is None:
            raise BagNotFoundError(f"{self.root}: slide {slide_id} has no embeddings in set {es.id} "
                                   f"({es.encoder_name}); list its slides with SELECT slide_id FROM bags "
                                   f"WHERE set_id = '{es.id}'")
        directory = self._checked(commit, f"emb/{es.id}/", slide_id, f"the {es.encoder_name} embeddings")
        return _arrays.open_array(directory / "emb" / es.id)

    def read_pixels(self, tiling_id: str, slide_id: str, indices: np.ndarray | None = None) -> np.ndarray:
        commit, pixels, _ = self._tiled(slide_id, tiling_id)
        if not pixels:
            raise PixelsNotCachedError(f"{self.root}: slide {slide_id} has no cached pixels for tiling {tiling_id}; "
                                       "extract with --cache-pixels")
        directory = self._checked(commit, f"pix/{tiling_id}/", slide_id, "the cached pixels")
        arr = _arrays.open_array(directory / "pix" / tiling_id)
        return arr[...] if indices is None else arr.get_orthogonal_selection((np.asarray(indices),))

    def read_by_tile_ids(self, es: EmbeddingSet, tile_ids: list[int] | np.ndarray) -> np.ndarray:
        """Embeddings for arbitrary tile ids, in the order given; reads only the slides involved."""
        ids = np.asarray(tile_ids)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise InvalidArgumentError(f"tile_ids must be a list or 1-d array of integer tile ids, got "
                                       f"{ids.dtype} of shape {ids.shape}")
        wanted = pa.table({"tile_id": pa.array(ids.astype(np.int64)), "pos": pa.array(np.arange(len(ids)))})
        cur = self._plain_con.cursor()
        try:
            cur.register("wanted", wanted)
            hits = cur.sql("SELECT w.pos, t.slide_id, t.tile_index FROM wanted w JOIN tiles t USING (tile_id) "
                           "WHERE t.tiling_id = ? ORDER BY t.slide_id, t.tile_index", params=[es.tiling_id]
                           ).to_arrow_table()
        finally:
            cur.close()
        if hits.num_rows != len(ids):
            found = set(hits.column("pos").to_pylist())
            missing = [int(ids[i]) for i in range(len(ids)) if i not in found]
            raise TileIdsNotFoundError(f"{self.root}: tile ids not in embedding set {es.encoder_name} (set {es.id}), "
                                       f"{len(missing)} of {len(ids)}: {_listed(missing)}; take tile ids from "
                                       f"the tiles of tiling {es.tiling_id}")
        out = np.empty((len(ids), *_row_shape(es)), dtype=es.dtype)
        pos = hits.column("pos").to_numpy()
        slides = hits.column("slide_id").to_numpy(zero_copy_only=False)
        index = hits.column("tile_index").to_numpy()
        for sid in dict.fromkeys(slides):
            sel = slides == sid
            out[pos[sel]] = self.bag_array(es, sid).get_orthogonal_selection((index[sel],))
        return out

    def iter_bags(self, es: EmbeddingSet) -> Iterator[tuple[str, pa.Table, np.ndarray]]:
        """Stream (slide_id, tiles, embeddings) for a whole embedding set, one slide in memory at a time."""
        for slide_id in self.bag_commits(es):
            yield slide_id, self.read_tiles(es.tiling_id, slide_id), self.read_bag(es, slide_id)

    def bag_sizes(self, es: EmbeddingSet) -> dict[str, int]:
        """slide_id → number of tiles (rows of its bag), for every slide of ``es``, sorted by slide id."""
        tiled = self._locations[1]
        return {sid: tiled[(sid, es.tiling_id)][2] for sid in self.bag_commits(es)}

    def tiles(self, model: str, slides: Sequence[str] | None = None, *,
              columns: Sequence[str] = TILE_COLUMNS) -> pa.Table:
        """Tiles of an embedding set with their embeddings: one row per tile, ``embedding`` aligned by construction.

        ``model`` is an encoder name, view name or set id; ``slides`` a subset of the set's slide ids
        (default: all). Rows follow ``slides`` (default: by slide id), and each slide's tiles follow
        tile_index. ``columns`` are the tile columns placed before ``embedding`` (FLOAT[dim], float32;
        view 0 of a multi-view set, as in SQL and ``bags``). Everything is read into memory: for a whole
        large set, stream with ``iter_bags``.
        """
        es = self.embedding_set(model)
        ids = self.bag_slide_ids(es, slides)
        cols = _tile_columns(columns)
        vector = pa.list_(pa.float32(), es.embed_dim)
        schema = pa.schema([*(_TILE_FIELDS.field(c) for c in cols), pa.field("embedding", vector)])
        parts = []
        for sid in ids:
            tiles = self.read_tiles(es.tiling_id, sid, columns=cols)
            emb = self.read_bag(es, sid)
            emb = np.ascontiguousarray(emb[:, 0] if emb.ndim == 3 else emb, dtype=np.float32)
            if len(emb) != tiles.num_rows:
                raise StoreDamageError(f"{self.root}: slide {sid} has {tiles.num_rows} tiles but {len(emb)} "
                                       f"{es.encoder_name} embeddings; re-extract the slide")
            vectors = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), es.embed_dim)
            parts.append(pa.table([*(tiles.column(c) for c in cols), vectors], schema=schema))
        return pa.concat_tables(parts) if parts else schema.empty_table()

    def bag_slide_ids(self, es: EmbeddingSet, slides: Sequence[str] | None = None) -> list[str]:
        """The slide ids of ``es`` (by slide id), or ``slides`` after checking each has a bag in it."""
        sizes = self.bag_sizes(es)
        if slides is None:
            return list(sizes)
        wanted = _str_list(slides, "slides", "slide ids")
        missing = [s for s in wanted if s not in sizes]
        if missing:
            raise BagNotFoundError(f"{self.root}: {len(missing)} of the {len(wanted)} slides given have no bag in "
                                   f"{es.encoder_name} (set {es.id}): {_listed(missing)}; list the set's slides "
                                   f"with SELECT slide_id FROM bags WHERE set_id = '{es.id}'")
        return wanted

    # --- embedding views ---------------------------------------------------------------------

    def _rows_reader(self, es: EmbeddingSet) -> _sql.RowsReader:
        """Embeddings (view 0, float32) for rows given as (slide_id, tile_index) arrays, one slide at a time."""
        recent: dict[str, np.ndarray] = {}
        lock = threading.Lock()

        def bag(slide_id: str) -> np.ndarray:
            with lock:
                found = recent.get(slide_id)
            if found is None:
                emb = self.read_bag(es, slide_id)
                found = np.ascontiguousarray(emb[:, 0] if emb.ndim == 3 else emb, dtype=np.float32)
                with lock:
                    # Scans deliver rows slide by slide; two slides cover a boundary between threads.
                    if len(recent) >= 4:
                        recent.pop(next(iter(recent)))
                    recent[slide_id] = found
            return found

        def rows(slide_ids: np.ndarray, tile_index: np.ndarray) -> np.ndarray:
            out = np.empty((len(slide_ids), es.embed_dim), np.float32)
            for sid in dict.fromkeys(slide_ids):
                sel = slide_ids == sid
                out[sel] = bag(sid)[tile_index[sel]]
            return out

        return rows

    def _mean_reader(self, es: EmbeddingSet) -> _sql.MeanReader:
        def mean(slide_id: str) -> np.ndarray:
            emb = self.read_bag(es, slide_id)
            return (emb[:, 0] if emb.ndim == 3 else emb).mean(0, dtype=np.float64).astype(np.float32)

        return mean

    # --- summary -----------------------------------------------------------------------------

    def info(self) -> StoreInfo:
        counts = self._tables(
            "SELECT (SELECT count(*) FROM slides) AS slides, (SELECT sum(n_tiles) FROM slide_tilings) AS tiles, "
            "(SELECT count(*) FROM failures) AS failures, (SELECT count(*) FROM labels) AS labelled").to_pylist()[0]
        bag_counts = {r["set_id"]: (r["slides"], int(r["tiles"] or 0)) for r in self._tables(
            "SELECT set_id, count(*) AS slides, sum(n_tiles) AS tiles FROM bags GROUP BY set_id").to_pylist()}
        sets = tuple(EmbeddingSetInfo(view, es.id, es.encoder_name, es.embed_dim, es.dtype,
                                      *bag_counts.get(es.id, (0, 0))) for view, es in self.view_names().items())
        tilings = tuple(TilingInfo(r["tiling_id"], r["tile_size"], r["target_mpp"], r["slides"],
                                   int(r["tiles"] or 0), r["with_pixels"]) for r in self._tables(
            "SELECT t.tiling_id, t.tile_size, t.target_mpp, count(st.slide_id) AS slides, sum(st.n_tiles) AS tiles, "
            "count(*) FILTER (WHERE st.pixels) AS with_pixels FROM tilings t LEFT JOIN slide_tilings st "
            "USING (tiling_id) GROUP BY ALL ORDER BY t.target_mpp, t.tile_size").to_pylist())
        staging = sum(1 for _ in (self.root / STAGING).iterdir()) if (self.root / STAGING).is_dir() else 0
        return StoreInfo(
            path=self.root, version=self.version, slides=counts["slides"], tiles=int(counts["tiles"] or 0),
            labelled_slides=counts["labelled"], failures=counts["failures"],
            encoders=tuple(sorted({e.name for e in self.encoders()})), tilings=tilings, embedding_sets=sets,
            bytes_on_disk=self.state.bytes(), staging=staging, commits_since_checkpoint=len(self.state.entries),
            damaged=tuple(f"{d.path}: {d.problem}" for _, d in self.state.damaged))


def _row_shape(es: EmbeddingSet) -> tuple[int, ...]:
    return (es.embed_dim,) if es.views == 1 else (es.views, es.embed_dim)


def _listed(items: list, shown: int = 5) -> str:
    """The first few items of a long list, and how many more there are."""
    head = ", ".join(str(i) for i in items[:shown])
    return head + (f" and {len(items) - shown} more" if len(items) > shown else "")


def _str_list(value: Iterable[str], arg: str, what: str) -> list[str]:
    """``value`` as a list of str; a bare string is refused (it would be read as its characters)."""
    if isinstance(value, str):
        raise InvalidArgumentError(f"{arg} must be a list of {what}, got the string {value!r:.60}; "
                                   f"write {arg}=[{value!r:.60}]")
    if not isinstance(value, Iterable):
        raise InvalidArgumentError(f"{arg} must be a list of {what}, got {type(value).__name__}")
    items = list(value)
    for item in items:
        if not isinstance(item, str):
            raise InvalidArgumentError(f"{arg} must be a list of {what} (str), got {type(item).__name__} {item!r:.60}")
    return items


def _tile_columns(columns: Sequence[str]) -> list[str]:
    cols = _str_list(columns, "columns", "tile columns")
    unknown = [c for c in cols if c not in _TILE_FIELDS.names]
    if unknown:
        raise InvalidArgumentError(f"columns: no tile column {unknown[0]!r}; choose from "
                                   f"{', '.join(_TILE_FIELDS.names)} (the embedding is always added)")
    return list(dict.fromkeys(cols))


def _require_pandas() -> None:
    """pandas is optional: featurestore does not install it, so say how to get it."""
    try:
        importlib.import_module("pandas")
    except ImportError as err:
        raise MissingDependencyError("pandas=True needs pandas, which featurestore does not install: "
                                     "run `pip install pandas`, or use the pyarrow Table (pandas=False)") from err


def _one_line(err: duckdb.Error) -> str:
    """DuckDB's message without its multi-line query excerpt, and where to look for valid names."""
    text = " ".join(line.strip() for line in str(err).split("\n\n", 1)[0].splitlines() if line.strip())
    if isinstance(err, duckdb.CatalogException | duckdb.BinderException):
        text += " (SHOW TABLES lists the views, DESCRIBE <view> their columns)"
    return text


def _damage_in(err: duckdb.Error) -> str:
    """Our damage message when a UDF raised StoreDamageError inside a DuckDB query, else ''."""
    text = str(err)
    marker = "StoreDamageError: "
    return text.split(marker, 1)[1].splitlines()[0] if marker in text else ""
