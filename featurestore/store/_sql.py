"""DuckDB over one snapshot: a view per table, and two views per embedding set.

Table views read the snapshot's files — its checkpoint's folded tables plus the commits after it —
and keep, for each key, the row of the latest commit. ``tiles`` keeps only tiles from the commit
that ``slide_tilings`` points at, so re-tiling a slide replaces its tiles.

``emb_<model>`` is the ``tiles`` view with an ``embedding`` column computed by a vectorised Python
function from the Zarr arrays. DuckDB evaluates it only for rows that pass the filters it pushes
into the tile scan (``slide_id = …``, ``IN (…)`` lists, tile ranges) and not at all when the column
is not selected, so such a query reads only those slides' arrays, and ``SHOW TABLES`` lists the
view like any other. A filter that arrives through a join (``JOIN labels … WHERE label = 1``) is
applied after the vectors are computed; push it into the tile side with an ``IN (…)`` list.
``slide_emb_<model>`` does the same per slide: the mean of its tiles, computed in numpy (DuckDB
has no array-valued ``avg``; one ``avg`` per dimension was 2× slower at 1M tiles × 1024).
"""

from __future__ import annotations

from collections.abc import Callable

import duckdb
import numpy as np
import pyarrow as pa
from duckdb import sqltypes

from featurestore.schemas import FREE_TABLES, TABLES, EmbeddingSet, ReadOnlyError, arrow_schema
from featurestore.store._snapshot import State

KEYS: dict[str, tuple[str, ...]] = {
    "slides": ("slide_id",),
    "tilings": ("tiling_id",),
    "encoders": ("encoder_id",),
    "embedding_sets": ("set_id",),
    "slide_tilings": ("slide_id", "tiling_id"),
    "bags": ("set_id", "slide_id"),
    "runs": ("run_id",),
    "labels": ("slide_id",),
    "predictions": ("run_id", "slide_id", "seed", "fold"),
    "slide_embeddings": ("set_id", "slide_id", "bag_commit_id"),
    "imports": ("set_id", "slide_id"),
    "slide_features": ("set_id", "slide_id"),
}
"""Rows with equal keys are versions of one thing; the latest commit wins. Failures keep history."""

GROUPS: dict[str, tuple[str, ...]] = {
    "annotations": ("slide_id",),
    "tile_annotations": ("slide_id", "tiling_id"),
}
"""Tables whose rows come in groups: the latest commit of a group replaces all of the group's rows
(a slide's annotation import brings every class and every overlap at once)."""

RAW = "store_files"
"""Schema of the unresolved per-file views (every version of every row); SHOW TABLES lists only ``main``."""

VARIABLE_COLUMNS = {"labels"}
"""Tables whose files may have different columns (each labels import brings its own)."""

ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}

RowsReader = Callable[[np.ndarray, np.ndarray], np.ndarray]
MeanReader = Callable[[str], np.ndarray]


def table_names() -> list[str]:
    return [*TABLES, *FREE_TABLES]


def table_schema(name: str) -> pa.Schema:
    """The columns a commit writes for table ``name``, before ``commit_id``."""
    return FREE_TABLES[name] if name in FREE_TABLES else arrow_schema(TABLES[name])


def empty_schema(name: str) -> pa.Schema:
    return table_schema(name).append(pa.field("commit_id", pa.string()))


def quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def check_read_only(query: str) -> None:
    """Let through exactly one SELECT (or a plain EXPLAIN of one); refuse everything else in one line.

    Every statement type but SELECT can change the connection, the store or the disk, and
    ``EXPLAIN ANALYZE`` executes the statement it explains, so only a plain EXPLAIN of a SELECT passes.
    """
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as err:
        raise duckdb.ParserException(f"SQL syntax error: {str(err).splitlines()[0]}") from err
    if len(statements) != 1:
        raise ReadOnlyError(f"fs sql runs exactly one statement, got {len(statements)}; send them one at a time")
    try:
        kind = statements[0].type
    except ValueError as err:  # a statement type newer than the Python enum: certainly not a SELECT
        raise ReadOnlyError("fs sql is read-only: only SELECT and EXPLAIN SELECT run") from err
    if kind == duckdb.StatementType.EXPLAIN:
        _check_explain(query)
    elif kind != duckdb.StatementType.SELECT:
        raise ReadOnlyError(f"fs sql is read-only: {kind.name} statements are refused; "
                            "only SELECT (with WITH, DESCRIBE, SUMMARIZE, SHOW...) and EXPLAIN SELECT run")


def _check_explain(query: str) -> None:
    keywords = [pos for pos, kind in duckdb.tokenize(query) if kind != duckdb.token_type.comment]
    inner = query[keywords[1]:] if len(keywords) > 1 else ""
    if inner[:7].upper() in ("ANALYZE", "ANALYSE"):
        raise ReadOnlyError("fs sql is read-only: EXPLAIN ANALYZE executes its statement and is refused; "
                            "use EXPLAIN without ANALYZE")
    try:
        kinds = [s.type for s in duckdb.extract_statements(inner)]
    except (duckdb.Error, ValueError):  # ValueError: a type newer than the Python enum
        kinds = []
    if kinds != [duckdb.StatementType.SELECT]:
        raise ReadOnlyError("fs sql is read-only: only EXPLAIN of a SELECT runs (EXPLAIN options are refused)")


NO_EXTENSIONS = "SET autoinstall_known_extensions = false; SET autoload_known_extensions = false"
"""User SQL can neither fetch nor load an extension (``read_csv('http://…')`` would install httpfs)."""


def typed_empty(name: str) -> str:
    """A zero-row table with ``name``'s current columns, defined on a connection whose views use it."""
    return f"{RAW}._typed_{name}"


def by_name(name: str, *, legacy: bool) -> bool:
    """Whether ``read_files`` reads table ``name``'s files by column name (through its typed empty table)."""
    return legacy or name in VARIABLE_COLUMNS


def read_files(name: str, files: list, *, legacy: bool) -> str:
    """SQL reading ``files`` of table ``name`` with exactly the current columns (older files get nulls).

    Files written before a column existed (``legacy`` snapshots of migrated stores) are read by name and
    completed from the typed empty table; otherwise columns match by position, and only labels vary,
    because union_by_name makes DuckDB open every file when the view is defined rather than when read.
    """
    listed = ", ".join(quote(str(f)) for f in files)
    if not by_name(name, legacy=legacy):
        return f"SELECT * FROM read_parquet([{listed}])"
    return (f"SELECT * FROM {typed_empty(name)} UNION ALL BY NAME "
            f"SELECT * FROM read_parquet([{listed}], union_by_name=true)")


def latest(name: str, source: str) -> str:
    """The rows of ``source`` that the newest commit of their key (or group) wrote."""
    if name in KEYS:
        keys = ", ".join(KEYS[name])
        return f"SELECT * FROM {source} QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY commit_id DESC) = 1"
    if name in GROUPS:
        keys = ", ".join(GROUPS[name])
        return f"SELECT * FROM {source} QUALIFY commit_id = max(commit_id) OVER (PARTITION BY {keys})"
    return f"SELECT * FROM {source}"


def connect(state: State) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection whose table views read exactly the files of ``state``."""
    con = duckdb.connect(":memory:")
    con.execute(f"CREATE SCHEMA {RAW}")
    for name in table_names():
        raw = f"{RAW}.{name}"
        files = state.table_files(name)
        source = read_files(name, files, legacy=state.legacy) if files else f"SELECT * FROM {typed_empty(name)}"
        if not files or by_name(name, legacy=state.legacy):
            con.register("_empty", empty_schema(name).empty_table())
            con.execute(f"CREATE TABLE {typed_empty(name)} AS SELECT * FROM _empty")
            con.unregister("_empty")
        con.execute(f"CREATE VIEW {raw} AS {source}")
        if name not in ("tiles", "tile_annotations"):
            con.execute(f"CREATE VIEW {name} AS {latest(name, raw)}")
    con.execute(f"CREATE VIEW tiles AS SELECT t.* FROM {RAW}.tiles t JOIN slide_tilings st "
                "ON t.slide_id = st.slide_id AND t.tiling_id = st.tiling_id AND t.commit_id = st.commit_id")
    # An import that leaves a tiling without overlaps (shapes only on glass) writes no rows for it: the
    # slide's newest annotations commit still retires the overlaps of every import before it.
    con.execute("CREATE VIEW tile_annotations AS SELECT t.* FROM "
                f"({latest('tile_annotations', RAW + '.tile_annotations')}) t "
                "JOIN (SELECT slide_id, max(commit_id) AS since FROM annotations GROUP BY slide_id) a "
                "ON t.slide_id = a.slide_id AND t.commit_id >= a.since")
    con.execute(NO_EXTENSIONS)
    return con


def lock(con: duckdb.DuckDBPyConnection) -> None:
    """No more configuration changes on ``con``: call once its views and functions are defined."""
    con.execute("SET lock_configuration = true")


def query(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> pa.Table:
    cur = con.cursor()
    try:
        return cur.sql(sql, params=params or None).to_arrow_table()
    finally:
        cur.close()


def add_embedding_views(con: duckdb.DuckDBPyConnection, view: str, es: EmbeddingSet, rows: RowsReader,
                        mean: MeanReader) -> None:
    """Define ``view`` (tiles + embedding) and ``slide_<view>`` (per-slide mean) for one embedding set."""
    vector = duckdb.array_type(sqltypes.FLOAT, es.embed_dim)

    def tile_vectors(slide_ids: pa.Array, tile_index: pa.Array) -> pa.Array:
        out = rows(slide_ids.to_numpy(zero_copy_only=False), tile_index.to_numpy())
        return pa.FixedSizeListArray.from_arrays(pa.array(out.ravel()), es.embed_dim)

    def slide_means(slide_ids: pa.Array) -> pa.Array:
        ids = slide_ids.to_pylist()
        out = np.stack([mean(s) for s in ids]) if ids else np.empty((0, es.embed_dim), np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(out.ravel()), es.embed_dim)

    tile_fn, mean_fn = f"_emb_{es.id}", f"_slide_mean_{es.id}"
    con.create_function(tile_fn, tile_vectors, [sqltypes.VARCHAR, sqltypes.BIGINT], vector, type="arrow",
                        side_effects=False)
    con.create_function(mean_fn, slide_means, [sqltypes.VARCHAR], vector, type="arrow", side_effects=False)
    con.execute(f"CREATE VIEW {view} AS SELECT t.slide_id, t.tile_index, t.tile_id, t.x, t.y, "
                f"{tile_fn}(t.slide_id, t.tile_index) AS embedding "
                f"FROM (SELECT slide_id FROM bags WHERE set_id = {quote(es.id)}) b "
                f"JOIN tiles t ON t.slide_id = b.slide_id AND t.tiling_id = {quote(es.tiling_id)}")
    con.execute(f"CREATE VIEW slide_{view} AS SELECT slide_id, n_tiles, {mean_fn}(slide_id) AS embedding "
                f"FROM bags WHERE set_id = {quote(es.id)} AND n_tiles > 0")
