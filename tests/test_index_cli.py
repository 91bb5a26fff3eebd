"""fs index / search / import / export through Typer's runner, on an app that only has these commands."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from featurestore.cli.search import Kind, register
from featurestore.index import KINDS
from featurestore.store import SlideCommit, Store, tiles_table
from tests.conftest import commit_random_slide, make_encoder, make_slide

runner = CliRunner()
app = typer.Typer()
register(app)


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def store_path(tmp_path, tiling):
    store = Store.create(tmp_path / "s")
    for i in range(4):
        commit_random_slide(store, i, tiling, [make_encoder("uni", 8)], 30, pixels=True)
    csv = tmp_path / "labels.csv"
    csv.write_text("filename,label\n" + "".join(f"slide_{i}.svs,{i % 2}\n" for i in range(4)))
    store.import_labels(csv)
    return store.root


def tile_of(store_path, offset: int = 3) -> int:
    return Store.open(store_path).sql(f"SELECT tile_id FROM tiles ORDER BY tile_id LIMIT 1 OFFSET {offset}"
                                      ).column(0)[0].as_py()


def test_build_info_and_search(store_path, tmp_path):
    built = run("index", "build", "--model", "uni", "-s", store_path)
    assert built.exit_code == 0, built.output
    assert "built: uni index (flat) holds 120 vectors of 4 slides" in built.output.replace("\n", " ")
    info = run("index", "info", "-m", "uni", "-s", store_path)
    assert info.exit_code == 0 and "up to date" in info.output and "IDMap,Flat" in info.output
    tile = tile_of(store_path)
    found = run("search", "-m", "uni", "--tile", tile, "-k", 3, "-s", store_path, "-f", "json")
    assert found.exit_code == 0, found.output
    rows = json.loads(found.output)
    assert [r["rank"] for r in rows] == [1, 2, 3] and rows[0]["tile_id"] == tile and "label" in rows[0]
    query = ("search", "-m", "uni", "--tile", tile, "-s", store_path, "-f", "json")
    filtered = run(*query, "--where", "l.label = 1")
    assert {r["label"] for r in json.loads(filtered.output)} == {1}
    grouped = run(*query, "--group-by", "slide")
    assert len({r["slide_id"] for r in json.loads(grouped.output)}) == 4
    slides = run("search", "-m", "uni", "--slide", make_slide(1).slide_id, "-s", store_path, "-f", "json")
    assert json.loads(slides.output)[0]["slide_id"] == make_slide(1).slide_id
    sheet = tmp_path / "hits.png"
    saved = run("search", "-m", "uni", "--tile", tile, "-k", 4, "--save", sheet, "-s", store_path)
    assert saved.exit_code == 0 and sheet.stat().st_size > 0
    table = run("search", "-m", "uni", "--query", f"SELECT embedding FROM emb_uni WHERE tile_id = {tile}",
                "-s", store_path)
    assert table.exit_code == 0 and "score" in table.output


def test_stale_and_missing_index_are_one_line_errors(store_path, tiling):
    tile = tile_of(store_path)
    missing = run("search", "-m", "uni", "--tile", tile, "-s", store_path)
    assert missing.exit_code == 2 and "fs index build --model uni" in missing.output.replace("\n", " ")
    assert run("index", "build", "-m", "uni", "--kind", "hnsw", "-s", store_path).exit_code == 0
    commit_random_slide(Store.open(store_path), 1, tiling, [make_encoder("uni", 8)], 12, seed=7)
    stale = run("search", "-m", "uni", "--tile", tile, "-s", store_path)
    assert stale.exit_code == 2 and "stale" in stale.output and len(stale.output.strip().splitlines()) <= 2
    info = run("index", "info", "-m", "uni", "-s", store_path)
    assert "stale" in info.output and "1 slide re-written" in info.output
    rebuilt = run("index", "build", "-m", "uni", "-s", store_path)
    assert rebuilt.exit_code == 0 and "rebuilt: uni index (hnsw" in rebuilt.output


def test_bad_arguments(store_path):
    assert run("search", "-m", "uni", "-s", store_path).exit_code == 2
    both = run("search", "-m", "uni", "--tile", 1, "--slide", "x", "-s", store_path)
    assert both.exit_code == 2 and "exactly one" in both.output
    wrong = run("index", "build", "-m", "uni", "--kind", "flat", "--nlist", 8, "-s", store_path)
    assert wrong.exit_code == 2 and "--nlist applies to ivf" in wrong.output.replace("\n", " ")
    assert run("index", "build", "-m", "uni", "--kind", "annoy", "-s", store_path).exit_code == 2


def test_vacuum_reports_orphaned_index_files_in_the_stores_summary(store_path):
    from featurestore.cli.maintenance import register as register_maintenance

    with_vacuum = typer.Typer()
    register(with_vacuum)
    register_maintenance(with_vacuum)
    assert run("index", "build", "-m", "uni", "-s", store_path).exit_code == 0
    orphan = next((store_path / "indexes").iterdir()) / "00000000000000000001-dead.faiss"
    orphan.write_bytes(bytes(3 * 2**20))
    then = time.time() - 7200
    os.utime(orphan, (then, then))
    result = runner.invoke(with_vacuum, ["vacuum", "-s", str(store_path), "--retention-hours", "1"])
    assert result.exit_code == 0, result.output
    assert "0 table parts, 1 index files: 3.0 MiB freed" in result.output.replace("\n", " ")
    assert not orphan.exists()


def test_image_search_builds_the_sets_teacher(tmp_path, tiling):
    import torch
    from PIL import Image

    from featurestore.encoders import build_teacher

    teacher = build_teacher("test/tiny-cnn", device="cpu")
    pixels = np.random.default_rng(0).integers(0, 255, (6, tiling.tile_size, tiling.tile_size, 3), dtype=np.uint8)
    with torch.inference_mode():
        emb = teacher(torch.from_numpy(pixels)).numpy()
    store = Store.create(tmp_path / "s")
    slide = make_slide(0)
    tiles = tiles_table(slide.slide_id, tiling.id, np.arange(6) * 448, np.zeros(6), 0, 448, np.ones(6))
    store.commit_slide(SlideCommit(slide, tiling, tiles, {teacher.spec: emb}, dtype="float32"))
    assert run("index", "build", "-m", "test/tiny-cnn", "-s", store.root).exit_code == 0
    Image.fromarray(pixels[2]).save(tmp_path / "q.png")
    found = run("search", "-m", "test/tiny-cnn", "--image", tmp_path / "q.png", "--device", "cpu", "-k", 1,
                "-f", "json", "-s", store.root)
    assert found.exit_code == 0, found.output
    assert [r["tile_index"] for r in json.loads(found.output)] == [2]


def test_kind_choices_are_the_registrys(store_path):
    assert [k.value for k in Kind] == list(KINDS)
    built = run("index", "build", "-m", "uni", "--kind", KINDS[-1], "-s", store_path)
    assert f"uni index ({KINDS[-1]}" in built.output


def test_import_and_export(tmp_path):
    h5py = pytest.importorskip("h5py")
    src = tmp_path / "features_uni_v1"
    src.mkdir()
    with h5py.File(src / "case.h5", "w") as f:
        f["features"] = np.arange(40, dtype=np.float32).reshape(5, 8)
        f["coords"] = np.arange(10, dtype=np.int64).reshape(5, 2) * 512
        f["coords"].attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                                  "target_magnification": 20, "overlap": 0})
    store = tmp_path / "s"
    imported = run("import", src, "-s", store)
    assert imported.exit_code == 0, imported.output
    assert "imported 1 files (5 tiles) as uni_v1" in imported.output
    out = tmp_path / "out"
    exported = run("export", out, "-m", "uni_v1", "--format", "h5", "--layout", "stamp", "-s", store)
    assert exported.exit_code == 0, exported.output
    with h5py.File(out / "case.h5") as f:
        assert np.array_equal(f["feats"][...], np.arange(40, dtype=np.float32).reshape(5, 8))
        assert f.attrs["unit"] == "um"
    bad = run("import", tmp_path / "nothing-here", "-s", store)
    assert bad.exit_code == 2 and "no such file" in bad.output
