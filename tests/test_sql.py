"""SQL over the store: every view, vectors as FLOAT[dim], read-only enforcement."""

from __future__ import annotations

import contextlib
from pathlib import Path

import duckdb
import numpy as np
import pytest

from featurestore.schemas import Failure, ReadOnlyError, Run, SqlError, Tile, TilingSpec, stored_schema, utcnow
from featurestore.store import Store
from tests.conftest import commit_random_slide, make_encoder, make_slide


def _fill(tmp_path, tiling):
    """Two encoders over three slides, labels, a run and a failure."""
    store = Store.create(tmp_path / "s")
    encs = [make_encoder("uni", 8), make_encoder("test/tiny", 4)]
    written = [commit_random_slide(store, i, tiling, encs, 10 + i, dtype="float32") for i in range(3)]
    csv = tmp_path / "labels.csv"
    csv.write_text("filename,patient,label,grade\n" + "\n".join(
        f"slide_{i}.svs,p{i // 2},{i % 2},{i}" for i in range(3)) + "\n")
    store.import_labels(csv)
    store.register(Run("r1", "fs extract", "{}", "host", utcnow(), utcnow(), 1.0, 0.5, "ok"),
                   Failure("/bad.svs", "open", "SlideError", "truncated"))
    return store, written


@pytest.fixture
def filled(tmp_path, tiling):
    return _fill(tmp_path, tiling)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One filled store for tests that must leave it unchanged (and check that they do)."""
    return _fill(tmp_path_factory.mktemp("gate"), TilingSpec(target_mpp=0.5, tile_size=224))


def test_every_table_view(filled):
    store, _ = filled
    counts = {v: store.sql(f"SELECT count(*) AS n FROM {v}").column("n")[0].as_py()
              for v in ["slides", "tiles", "labels", "encoders", "embedding_sets", "tilings", "slide_tilings",
                        "bags", "runs", "failures"]}
    assert counts == {"slides": 3, "tiles": 33, "labels": 3, "encoders": 2, "embedding_sets": 2, "tilings": 1,
                      "slide_tilings": 3, "bags": 6, "runs": 1, "failures": 1}


def test_embedding_views_carry_float_arrays(filled):
    store, written = filled
    assert set(store.view_names()) == {"emb_uni", "emb_test_tiny"}
    types = dict(store.sql("DESCRIBE emb_uni").select(["column_name", "column_type"]).to_pylist()[i].values()
                 for i in range(6))
    assert types["embedding"] == "FLOAT[8]"
    rows = store.sql("SELECT slide_id, avg(embedding[1]) AS m, count(*) AS n FROM emb_uni GROUP BY slide_id "
                     "ORDER BY slide_id").to_pylist()
    for i, row in enumerate(rows):
        assert row["n"] == 10 + i
        assert row["m"] == pytest.approx(written[i]["uni"][:, 0].mean(), rel=1e-5)
    self_sim = store.sql("SELECT min(array_cosine_similarity(embedding, embedding)) AS s FROM emb_test_tiny")
    assert self_sim.column("s")[0].as_py() == pytest.approx(1.0, abs=1e-6)


def test_vector_sql_joins_labels_and_self_joins(filled):
    store, written = filled
    per_label = store.sql("SELECT l.label, count(*) AS n FROM emb_uni e JOIN labels l USING (slide_id) "
                          "GROUP BY l.label ORDER BY l.label").to_pylist()
    assert per_label == [{"label": 0, "n": 10 + 12}, {"label": 1, "n": 11}]
    nearest = store.sql("SELECT a.tile_id, b.tile_id AS hit FROM emb_uni a, emb_uni b WHERE a.tile_index = 0 "
                        "AND a.slide_id = b.slide_id QUALIFY row_number() OVER (PARTITION BY a.tile_id ORDER BY "
                        "array_cosine_similarity(a.embedding, b.embedding) DESC) = 1").to_pylist()
    assert all(r["tile_id"] == r["hit"] for r in nearest) and len(nearest) == 3
    mean_vec = store.sql(f"SELECT list_avg(list_transform(list(embedding), lambda x: x[2])) AS m FROM emb_uni "
                         f"WHERE slide_id = '{make_slide(2).slide_id}'").column("m")[0].as_py()
    assert mean_vec == pytest.approx(written[2]["uni"][:, 1].mean(), rel=1e-5)


def test_per_slide_mean_embedding_view(filled):
    store, written = filled
    rows = store.sql("SELECT slide_id, n_tiles, embedding FROM slide_emb_uni ORDER BY slide_id").to_pylist()
    assert [r["n_tiles"] for r in rows] == [10, 11, 12]
    for i, row in enumerate(rows):
        np.testing.assert_allclose(row["embedding"], written[i]["uni"].mean(0), rtol=1e-5, atol=1e-6)
    both = store.sql("SELECT count(*) AS n FROM slide_emb_uni s JOIN emb_uni e USING (slide_id)")
    assert both.column("n")[0].as_py() == 33


def test_same_encoder_on_two_tilings_gets_distinct_views(tmp_path, tiling):
    store = Store.create(tmp_path / "s")
    enc = make_encoder("uni", 4)
    commit_random_slide(store, 0, tiling, [enc], 5)
    commit_random_slide(store, 1, TilingSpec(1.0, 224), [enc], 6)
    names = store.view_names()
    assert len(names) == 2 and all(n.startswith("emb_uni_") for n in names)
    for name in names:
        assert store.sql(f"SELECT count(*) AS n FROM {name}").column("n")[0].as_py() in (5, 6)


ONE_OF_EACH = {
    "INSERT": "INSERT INTO slides SELECT * FROM slides",
    "UPDATE": "UPDATE slides SET path = 'x'",
    "CREATE": "CREATE OR REPLACE VIEW slides AS SELECT 1 AS forged",
    "DELETE": "DELETE FROM slides",
    "PREPARE": "PREPARE p AS SELECT 1",
    "EXECUTE": "EXECUTE p",
    "ALTER": "ALTER VIEW slides RENAME TO gone",
    "TRANSACTION": "BEGIN TRANSACTION",
    "COPY": "COPY (SELECT 1) TO '{target}' (FORMAT csv)",
    "VACUUM(ANALYZE)": "ANALYZE",
    "SET": "SET threads = 1",
    "SET VARIABLE": "SET VARIABLE x = 1",
    "CREATE MACRO": "CREATE MACRO m(a) AS a",
    "DROP": "DROP VIEW slides",
    "EXPORT": "EXPORT DATABASE '{target}'",
    "PRAGMA": "PRAGMA enable_profiling",
    "VACUUM": "VACUUM",
    "CALL": "CALL pragma_version()",
    "LOAD": "LOAD httpfs",
    "LOAD(INSTALL)": "INSTALL httpfs",
    "UPDATE EXTENSIONS": "UPDATE EXTENSIONS",
    "ATTACH": "ATTACH '{target}' AS other",
    "DETACH": "DETACH other",
    "PRAGMA(COPY DATABASE)": "COPY FROM DATABASE memory TO other",
    "MERGE_INTO": "MERGE INTO slides USING slides AS s ON false WHEN NOT MATCHED THEN DO NOTHING",
    "MULTI": "SELECT 1; SELECT 2",
}
"""A statement of every type DuckDB's parser returns (keys name the type when the text suggests another)."""

NOT_FROM_TEXT = {"INVALID", "RELATION", "LOGICAL_PLAN", "MULTI", "ANALYZE", "VARIABLE_SET", "CREATE_FUNC",
                 "EXTENSION", "COPY_DATABASE"}
"""Types the parser never returns for SQL text (they come from DuckDB's APIs, or parse as another type)."""


def _parsed_type(query: str) -> str:
    try:
        return duckdb.extract_statements(query)[0].type.name
    except ValueError:  # a type newer than the Python enum (UPDATE EXTENSIONS)
        return "unknown"


def test_every_statement_type_is_covered():
    parsed = {_parsed_type(q.format(target="x")) for q in ONE_OF_EACH.values() if ";" not in q}
    allowed = {"SELECT", "EXPLAIN"}
    assert parsed | allowed | NOT_FROM_TEXT | {"unknown"} == set(duckdb.StatementType.__members__) | {"unknown"}, \
        "a statement type has no case here"


def _everything(store) -> dict[str, int]:
    """Every file under the store with its size: a refused statement must leave all of it as it was."""
    return {str(p): p.stat().st_size for p in store.root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kind", sorted(ONE_OF_EACH))
@pytest.mark.parametrize("wrap", ["{q}", "EXPLAIN ANALYZE {q}", "/* c */ explain\n  analyse {q}", "EXPLAIN {q}",
                                  "WITH a AS (SELECT 1) {q}"])
def test_only_selects_pass_the_gate(shared, kind, wrap):
    store, _ = shared
    statement = wrap.format(q=ONE_OF_EACH[kind].format(target=store.root / "featurestore.json"))
    before = _everything(store)
    with pytest.raises((ReadOnlyError, SqlError)):
        store.sql(statement)
    assert _everything(store) == before
    assert store.sql("SELECT count(*) AS n FROM slides").column("n")[0].as_py() == 3, "views unchanged"


@pytest.mark.parametrize("query", [
    "SELECT * FROM query('COPY (SELECT 1) TO ''{target}''')",
    "SELECT * FROM query('CREATE OR REPLACE VIEW slides AS SELECT 1')",
    "SELECT * FROM query_table('slides')",
    "EXPLAIN ANALYZE SELECT 1",
    "SELECT * FROM read_csv('http://127.0.0.1:9/x.csv')",
])
def test_table_functions_and_network_cannot_write_or_fetch(shared, tmp_path, query):
    store, _ = shared
    target = tmp_path / "x.csv"
    before = _everything(store)
    with contextlib.suppress(ReadOnlyError, SqlError):
        store.sql(query.format(target=target))
    assert _everything(store) == before and not target.exists()
    assert store.sql("SELECT count(*) AS n FROM slides").column("n")[0].as_py() == 3, "views unchanged"
    extensions = Path.home() / ".duckdb" / "extensions"
    assert not any(extensions.rglob("httpfs*")), "no extension was installed"


def test_reading_local_files_and_plain_explain_still_work(filled, tmp_path):
    store, _ = filled
    (tmp_path / "a.csv").write_text("x\n1\n2\n")
    assert store.sql(f"SELECT sum(x) AS s FROM read_csv('{tmp_path / 'a.csv'}')").column("s")[0].as_py() == 3
    assert store.sql("EXPLAIN SELECT count(*) FROM tiles").num_rows >= 1


def test_empty_store_views_exist(tmp_path):
    store = Store.create(tmp_path / "s")
    for view in ["slides", "tiles", "labels", "failures", "bags", "annotations", "tile_annotations", "slide_features"]:
        assert store.sql(f"SELECT count(*) AS n FROM {view}").column("n")[0].as_py() == 0
    assert store.sql("SELECT * FROM tiles").schema.names == stored_schema(Tile).names
