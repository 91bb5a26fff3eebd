"""DuckDB over the store: one view per table, one streamed view per embedding set.

Table views read every commit's Parquet files and keep, for each key, the row
of the latest commit, so a re-written slide replaces the earlier one. The
``tiles`` view keeps only tiles from the commit that the ``slide_tilings`` view
points at. Embedding views (``emb_<model>``) are Arrow streams read from the
Zarr arrays slide by slide, registered only for queries that mention them, so a
query never holds more than one slide's vectors in memory on our side.
``slide_emb_<model>`` is a second stream, one row per slide with the mean of
its tiles computed in numpy while the bag is in memory: DuckDB has no
array-valued ``avg``, and one ``avg`` per dimension over the tile stream ran 2×
slower than numpy at 1M tiles × 1024.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import pyarrow as pa

from featurestore.store._layout import COMMITS, GENESIS
from schemas import FREE_TABLES, TABLES, ReadOnlyError, stored_schema

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
}
"""Rows with equal keys are versions of one thing; the latest commit wins. Failures keep history."""

ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def check_read_only(query: str) -> None:
    """Refuse anything but SELECT/EXPLAIN: the SQL session must never change the store or the disk."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as err:
        raise duckdb.ParserException(f"SQL syntax error: {err}") from err
    if len(statements) != 1:
        raise ReadOnlyError(f"fs sql runs exactly one statement, got {len(statements)}; send them one at a time")
    kind = statements[0].type
    if kind not in ALLOWED:
        raise ReadOnlyError(f"fs sql is read-only: {kind.name} statements are refused; "
                            "only SELECT (with WITH, DESCRIBE, SUMMARIZE...) and EXPLAIN run")


def connect(root: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the store's table views.

    Globs are expanded when a query binds, so one connection sees commits published after it was
    opened. The genesis commit (an empty, typed file per table) keeps every glob non-empty; a table
    added to the format after a store's genesis is an empty typed table until a commit writes it.
    """
    con = duckdb.connect(":memory:")
    for name in [*TABLES, *FREE_TABLES]:
        raw = f"_raw_{name}"
        if (root / COMMITS / GENESIS / f"{name}.parquet").exists() or any((root / COMMITS).glob(f"*/{name}.parquet")):
            pattern = _quote(root / COMMITS / "*" / f"{name}.parquet")
            con.execute(f"CREATE VIEW {raw} AS SELECT * FROM read_parquet({pattern}, union_by_name=true)")
        else:
            schema = (FREE_TABLES[name].append(pa.field("commit_id", pa.string())) if name in FREE_TABLES
                      else stored_schema(TABLES[name]))
            con.register("_empty", schema.empty_table())
            con.execute(f"CREATE TABLE {raw} AS SELECT * FROM _empty")
            con.unregister("_empty")
        if name == "tiles":
            continue
        if name in KEYS:
            keys = ", ".join(KEYS[name])
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM {raw} "
                        f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY commit_id DESC) = 1")
        else:
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM {raw}")
    con.execute("CREATE VIEW tiles AS SELECT t.* FROM _raw_tiles t JOIN slide_tilings st "
                "ON t.slide_id = st.slide_id AND t.tiling_id = st.tiling_id AND t.commit_id = st.commit_id")
    return con


StreamFactory = Callable[[], pa.RecordBatchReader]


def register_embedding_views(cur: duckdb.DuckDBPyConnection, query: str,
                             embedding_views: dict[str, tuple[StreamFactory, StreamFactory]]) -> None:
    """Make the ``emb_<model>`` and ``slide_emb_<model>`` views that ``query`` names live on ``cur``.

    ``embedding_views`` maps a view name to the factories of its tile stream and its per-slide mean
    stream. A stream can be scanned once: a view the query names twice is materialised first."""
    for view, factories in embedding_views.items():
        for name, make_reader in zip((view, f"slide_{view}"), factories, strict=True):
            uses = len(re.findall(rf"\b{re.escape(name)}\b", query, flags=re.IGNORECASE))
            if uses == 1:
                cur.register(name, make_reader())
            elif uses > 1:
                cur.register(name, make_reader().read_all())


def stream(batches: Iterator[pa.RecordBatch], schema: pa.Schema) -> pa.RecordBatchReader:
    return pa.RecordBatchReader.from_batches(schema, batches)
