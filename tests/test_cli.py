"""The fs command through Typer's runner: output formats and one-line errors."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from featurestore.cli.main import app
from featurestore.store import Store
from tests.conftest import commit_random_slide, make_encoder

runner = CliRunner()


@pytest.fixture
def store_path(tmp_path, tiling):
    path = tmp_path / "store"
    assert runner.invoke(app, ["init", str(path)]).exit_code == 0
    store = Store.open(path)
    for i in range(2):
        commit_random_slide(store, i, tiling, [make_encoder("uni", 4)], 6)
    return path


def run(*args: str):
    return runner.invoke(app, list(args))


def test_info(store_path):
    result = run("info", "--store", str(store_path))
    assert result.exit_code == 0, result.output
    assert "slides 2" in result.output and "tiles 12" in result.output and "emb_uni" in result.output


def test_sql_formats(store_path, tmp_path):
    q = "SELECT slide_id, count(*) AS n FROM tiles GROUP BY slide_id ORDER BY slide_id"
    table = run("sql", q, "--store", str(store_path))
    assert table.exit_code == 0 and "slide_id" in table.output
    csv = run("sql", q, "-s", str(store_path), "--format", "csv")
    assert csv.output.splitlines()[0] == '"slide_id","n"' and len(csv.output.splitlines()) == 3
    js = run("sql", q, "-s", str(store_path), "--format", "json")
    assert [r["n"] for r in json.loads(js.output)] == [6, 6]
    out = tmp_path / "r.parquet"
    pq_run = run("sql", "SELECT * FROM emb_uni", "-s", str(store_path), "--format", "parquet", "-o", str(out))
    assert pq_run.exit_code == 0 and pq.read_table(out).num_rows == 12
    vec_csv = run("sql", "SELECT embedding FROM emb_uni LIMIT 1", "-s", str(store_path), "--format", "csv")
    assert vec_csv.exit_code == 0 and vec_csv.output.count(",") >= 3


def test_write_statement_is_one_line_error(store_path):
    result = run("sql", "DELETE FROM slides", "-s", str(store_path))
    assert result.exit_code == 2
    assert "read-only" in result.output and len(result.output.strip().splitlines()) == 1


def test_not_a_store_is_one_line_error(tmp_path):
    result = run("info", "-s", str(tmp_path))
    assert result.exit_code == 2
    assert f"{tmp_path}: not a feature store" in result.output.replace("\n", "")
    assert "fs init" in result.output


def test_labels_import_and_bad_row(store_path, tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("filename,label\nslide_0.svs,1\nslide_1.svs,0\n")
    assert run("labels", "import", str(good), "-s", str(store_path)).exit_code == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("filename,label\nslide_0.svs,1\nmissing.svs,0\n")
    result = run("labels", "import", str(bad), "-s", str(store_path))
    assert result.exit_code == 2 and "bad.csv line 3" in result.output.replace("\n", "")
    labels = run("sql", "SELECT count(*) AS n FROM labels WHERE label = 1", "-s", str(store_path), "-f", "json")
    assert json.loads(labels.output) == [{"n": 1}]


def test_unknown_model_lists_choices(store_path):
    with pytest.raises(KeyError, match="emb_uni"):
        Store.open(store_path).embedding_set("virchow2")


def test_verify_vacuum_compact_and_migrate_from_the_command_line(store_path):
    assert run("compact", "-s", str(store_path)).exit_code == 0
    clean = run("verify", "-s", str(store_path), "--deep")
    assert clean.exit_code == 0 and "no damage found" in clean.output
    snap = Store.open(store_path).snapshot()
    commit = next(iter(snap.bag_commits(snap.embedding_set("uni")).values()))
    shard = next(p for p in (store_path / "commits" / commit / "emb").rglob("*")
                 if p.is_file() and p.name != "zarr.json")
    shard.write_bytes(shard.read_bytes()[:10])
    read = run("sql", "SELECT sum(embedding[1]) FROM emb_uni", "-s", str(store_path))
    assert read.exit_code == 2 and "Traceback" not in read.output and "fs verify" in read.output
    damaged = run("verify", "-s", str(store_path))
    assert damaged.exit_code == 1 and str(shard) in damaged.output.replace("\n", "")
    dropped = run("verify", "-s", str(store_path), "--drop-damaged")
    assert dropped.exit_code == 0 and "dropped 1 commits" in dropped.output
    assert "slides 1" in run("info", "-s", str(store_path)).output
    vacuum = run("vacuum", "-s", str(store_path), "--retention-hours", "0")
    assert vacuum.exit_code == 0 and "removed" in vacuum.output
    assert "already current" in run("migrate", str(store_path)).output.replace("\n", "")


def test_sql_output_never_replaces_a_file_unless_asked(store_path, tmp_path):
    out = tmp_path / "mine.csv"
    out.write_text("precious")
    refused = run("sql", "SELECT 1 AS x", "-s", str(store_path), "-f", "csv", "-o", str(out))
    assert refused.exit_code == 2 and "--overwrite" in refused.output and out.read_text() == "precious"
    assert run("sql", "SELECT 1 AS x", "-s", str(store_path), "-f", "csv", "-o", str(out), "--overwrite").exit_code == 0
    assert out.read_text().splitlines() == ['"x"', "1"]


@pytest.mark.parametrize("args", [
    ["info", "-s", "{missing}"],
    ["info", "-s", "{file}"],
    ["sql", "SELEC 1", "-s", "{store}"],
    ["sql", "SELECT * FROM nope", "-s", "{store}"],
    ["sql", "EXPLAIN ANALYZE COPY (SELECT 1) TO '{file}'", "-s", "{store}"],
    ["labels", "import", "{missing}", "-s", "{store}"],
    ["labels", "import", "{file}", "-s", "{store}"],
    ["export", "{file}", "-s", "{store}", "-m", "uni", "--layout", "trident"],
    ["train", "-s", "{store}", "-m", "uni", "--label", "label", "--out", "{file}"],
    ["index", "build", "-s", "{store}", "-m", "virchow2"],
    ["search", "-s", "{store}", "-m", "uni", "--tile", "1"],
    ["verify", "-s", "{missing}"],
    ["migrate", "{file}"],
    ["extract", "{missing}", "-s", "{store}", "-m", "test/tiny-cnn"],
    ["init", "{file}"],
])
def test_bad_invocations_are_one_line_errors_never_tracebacks(store_path, tmp_path, args):
    afile = tmp_path / "a-file.txt"
    afile.write_text("slide_id,label\n")
    filled = [a.format(missing=tmp_path / "missing", file=afile, store=store_path) for a in args]
    result = run(*filled)
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert "error:" in result.output
