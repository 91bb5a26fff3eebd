"""Format 2 → 3 on a store written by the format-2 code itself (tests/data/store-v2.tar.gz).

The migration is killed at each of its steps, its checkpoint is damaged, and it races a second
migration and a writer: every time the store reads exactly what the old code read, plus nulls in
the new columns, and a later ``fs migrate`` finishes the job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from featurestore.cli.main import app
from featurestore.schemas import (
    ANNOTATIONS_SCHEMA,
    FORMAT_VERSION,
    TILE_ANNOTATIONS_SCHEMA,
    StoreVersionError,
    TileQuality,
    TilingSpec,
)
from featurestore.store import SlideCommit, Store, migrate, tiles_table
from tests.conftest import make_encoder, make_slide
from tests.test_kill_points import killed

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "data" / "store-v2.tar.gz"
NEW_SLIDES = make_slide(20).slide_id
"""Slides committed after the migration sort from here on; the fixture's are below."""


@pytest.fixture
def v2(tmp_path: Path) -> Path:
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / "store-v2"


def expected(root: Path) -> dict[str, tuple[str, list]]:
    data = json.loads((root / "expected.json").read_text())
    return {name: (data["queries"][name], data["rows"][name]) for name in data["queries"]}


def assert_reads_as_before(root: Path) -> None:
    store = Store.open(root, read_only=True)
    for name, (query, rows) in expected(root).items():
        got = [r for r in store.sql(query).to_pylist() if r.get("slide_id", "") < NEW_SLIDES]
        if name == "embeddings":
            assert [(r["slide_id"], r["tile_index"]) for r in got] == [(r["slide_id"], r["tile_index"]) for r in rows]
            assert np.allclose([r["embedding"] for r in got], [r["embedding"] for r in rows])
        else:
            assert got == rows, f"{name} differs after migration"
    nulls = store.sql("SELECT count(*) FILTER (WHERE sharpness IS NOT NULL OR pen_fraction IS NOT NULL "
                      "OR background_fraction IS NOT NULL) AS measured, count(*) AS n FROM tiles "
                      f"WHERE slide_id < '{NEW_SLIDES}'").to_pylist()[0]
    assert nulls["measured"] == 0 and nulls["n"] == len(expected(root)["tiles"][1]), "old tiles have no measures"


def commit_measured_slide(root: Path, i: int) -> None:
    """A format-3 commit: a new slide whose tiles carry quality measures."""
    store = Store.open(root)
    tiling, enc, n = TilingSpec(0.5, 224), make_encoder(dim=8), 4
    quality = TileQuality(np.full(n, 80.0), np.zeros(n), np.linspace(0, 0.3, n))
    tiles = tiles_table(make_slide(i).slide_id, tiling.id, np.arange(n) * 448, np.zeros(n), 0, 448, np.ones(n),
                        quality)
    emb = {enc: np.random.default_rng(i).standard_normal((n, 8)).astype(np.float32)}
    store.commit_slide(SlideCommit(make_slide(i), tiling, tiles, emb, None, "float16"))


def measured(root: Path) -> list:
    return Store.open(root, read_only=True).sql(
        f"SELECT background_fraction FROM tiles WHERE slide_id = '{make_slide(20).slide_id}' ORDER BY tile_index"
    ).column(0).to_pylist()


def checkpoint_format(root: Path) -> int:
    newest = max(p for p in (root / "checkpoints").iterdir() if p.name.isdigit())
    return json.loads((newest / "_checkpoint.json").read_text()).get("format", 2)


def test_a_format_2_store_is_refused_until_migrated_then_reads_as_before(v2):
    with pytest.raises(StoreVersionError, match=f"fs migrate {v2}"):
        Store.open(v2)
    result = CliRunner().invoke(app, ["migrate", str(v2)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert f"format 2 → {FORMAT_VERSION}" in said and "checkpoint at version" in said
    assert checkpoint_format(v2) == FORMAT_VERSION, "the migration folds the old files into a current checkpoint"
    assert_reads_as_before(v2)
    store = Store.open(v2)
    assert [t.id for t in store.tilings()] == [r["tiling_id"] for r in expected(v2)["tilings"][1]], \
        "format-2 tilings keep their ids"
    for table in ("annotations", "tile_annotations", "slide_features"):
        assert store.sql(f"SELECT count(*) FROM {table}").column(0)[0].as_py() == 0
    assert not store.verify(deep=True).problems
    commit_measured_slide(v2, 20)
    assert measured(v2) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert "already current" in " ".join(CliRunner().invoke(app, ["migrate", str(v2)]).output.split())


def test_killed_before_the_marker_switch_the_store_stays_format_2(v2):
    killed("featurestore.store._maintenance.write_marker", 1, "migrate", str(v2))
    with pytest.raises(StoreVersionError, match="fs migrate"):
        Store.open(v2)
    assert migrate(v2).to_version == FORMAT_VERSION
    assert_reads_as_before(v2)


def test_killed_after_the_marker_switch_the_store_reads_and_writes_then_migrate_finishes(v2):
    killed("featurestore.store._maintenance.compact", 1, "migrate", str(v2))
    assert checkpoint_format(v2) == 2, "no current checkpoint was written"
    assert_reads_as_before(v2)
    commit_measured_slide(v2, 20)  # format-3 files next to format-2 ones, read by column name
    assert measured(v2) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    report = migrate(v2)
    assert (report.from_version, report.checkpoint is not None) == (FORMAT_VERSION, True)
    assert checkpoint_format(v2) == FORMAT_VERSION
    assert_reads_as_before(v2)
    assert measured(v2) == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_a_damaged_migration_checkpoint_falls_back_to_the_old_format(v2):
    migrate(v2)
    commit_measured_slide(v2, 20)
    newest = max(p for p in (v2 / "checkpoints").iterdir() if p.name.isdigit())
    parts = json.loads((newest / "_checkpoint.json").read_text())["parts"]["tiles"]
    (v2 / parts[0][0]).write_bytes(b"")  # a truncated tiles part: the checkpoint is ignored
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_reads_as_before(v2)
        assert measured(v2) == pytest.approx([0.0, 0.1, 0.2, 0.3])


RACER = """
import sys
from featurestore.store import migrate
migrate(__import__("pathlib").Path(sys.argv[1]))
"""

WRITER = """
import sys
from pathlib import Path
from tests.test_store_migrate import commit_measured_slide
for i in range(20, 24):
    commit_measured_slide(Path(sys.argv[1]), i)
"""


def test_two_migrations_and_a_writer_race(v2):
    env = os.environ | {"PYTHONPATH": str(REPO)}
    migrate_a = subprocess.Popen([sys.executable, "-c", RACER, str(v2)], cwd=REPO, env=env)
    migrate_b = subprocess.Popen([sys.executable, "-c", RACER, str(v2)], cwd=REPO, env=env)
    assert migrate_a.wait(timeout=300) == 0 and migrate_b.wait(timeout=300) == 0
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(v2)], cwd=REPO, env=env)
    third = subprocess.Popen([sys.executable, "-c", RACER, str(v2)], cwd=REPO, env=env)
    assert writer.wait(timeout=300) == 0 and third.wait(timeout=300) == 0
    assert_reads_as_before(v2)
    store = Store.open(v2, read_only=True)
    assert store.sql("SELECT count(DISTINCT slide_id) FROM tiles WHERE sharpness = 80").column(0)[0].as_py() == 4
    assert not store.verify(deep=True).problems


def test_a_slide_s_latest_annotation_commit_replaces_all_its_rows_before_and_after_a_checkpoint(tmp_path):
    store = Store.create(tmp_path / "s")

    def overlaps(slide: int, tiling: str, classes: list[str], *, shapes: bool = True) -> None:
        rows = [{"slide_id": make_slide(slide).slide_id, "tiling_id": tiling, "tile_index": i, "tile_id": i,
                 "class_name": c, "overlap": 0.5} for c in classes for i in range(3)]
        with store.transaction() as txn:
            if shapes:
                txn.add_table("annotations", pa.Table.from_pylist(
                    [{"slide_id": make_slide(slide).slide_id, "class_name": c} for c in classes],
                    schema=ANNOTATIONS_SCHEMA))
            txn.add_table("tile_annotations", pa.Table.from_pylist(rows, schema=TILE_ANNOTATIONS_SCHEMA))

    overlaps(0, "a", ["Tumor", "Stroma"])
    overlaps(0, "b", ["Tumor"], shapes=False)  # a later tiling's overlaps, written by its extraction
    overlaps(1, "a", ["Stroma"])
    query = "SELECT slide_id, tiling_id, class_name, count(*) AS n FROM tile_annotations GROUP BY ALL ORDER BY ALL"
    want = [(make_slide(0).slide_id, "a", "Stroma", 3), (make_slide(0).slide_id, "a", "Tumor", 3),
            (make_slide(0).slide_id, "b", "Tumor", 3), (make_slide(1).slide_id, "a", "Stroma", 3)]
    assert [tuple(r.values()) for r in store.sql(query).to_pylist()] == want
    overlaps(0, "a", ["Necrosis"])  # re-import: every earlier overlap of slide 0 is gone, of both tilings
    want = [(make_slide(0).slide_id, "a", "Necrosis", 3), (make_slide(1).slide_id, "a", "Stroma", 3)]
    assert [tuple(r.values()) for r in store.sql(query).to_pylist()] == want
    store.checkpoint()
    overlaps(1, "a", ["Tumor"])
    want[1] = (make_slide(1).slide_id, "a", "Tumor", 3)
    assert [tuple(r.values()) for r in Store.open(tmp_path / "s").sql(query).to_pylist()] == want
    store.compact()
    assert [tuple(r.values()) for r in Store.open(tmp_path / "s").sql(query).to_pylist()] == want
    with store.transaction() as txn:  # a re-import whose shapes cover no tile retires the slide's overlaps
        txn.add_table("annotations", pa.Table.from_pylist([{"slide_id": make_slide(1).slide_id, "class_name": "Glass"}],
                                                          schema=ANNOTATIONS_SCHEMA))
    assert [tuple(r.values()) for r in store.sql(query).to_pylist()] == want[:1]
