"""The store: create/open checks, atomic commits, reads by slide / tile id / stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from featurestore.schemas import (
    FORMAT_VERSION,
    InvalidRecordError,
    NotAStoreError,
    ReadOnlyError,
    StoreExistsError,
    StoreVersionError,
    TilingSpec,
)
from featurestore.store import SlideCommit, Store, _arrays
from featurestore.store import snapshot as snapshot_module
from tests.conftest import commit_random_slide, make_encoder, make_slide

REPO = Path(__file__).resolve().parents[1]


def test_create_open_and_refusals(tmp_path):
    Store.create(tmp_path / "s")
    Store.open(tmp_path / "s")
    with pytest.raises(StoreExistsError, match="already exists"):
        Store.create(tmp_path / "s")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(StoreExistsError, match="not empty"):
        Store.create(tmp_path / "full")
    with pytest.raises(NotAStoreError, match="fs init"):
        Store.open(tmp_path / "full")


def test_newer_format_version_is_refused(tmp_path):
    Store.create(tmp_path / "s")
    marker = tmp_path / "s" / "featurestore.json"
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps(meta | {"format_version": FORMAT_VERSION + 1}))
    with pytest.raises(StoreVersionError, match="newer"):
        Store.open(tmp_path / "s")


def test_float32_round_trip_is_bit_exact(tmp_path, tiling):
    store = Store.create(tmp_path / "s")
    enc = make_encoder(dim=24)
    written = commit_random_slide(store, 1, tiling, [enc], 300, dtype="float32")
    es = store.embedding_set(enc.name)
    got = store.read_bag(es, make_slide(1).slide_id)
    assert got.dtype == np.float32
    assert np.array_equal(got, written[enc.name])


def test_float16_round_trip_within_rounding(tmp_path, tiling):
    store = Store.create(tmp_path / "s")
    enc = make_encoder(dim=24)
    written = commit_random_slide(store, 1, tiling, [enc], 300)
    got = store.read_bag(store.embedding_set(enc.name), make_slide(1).slide_id)
    assert got.dtype == np.float16
    assert np.array_equal(got, written[enc.name].astype(np.float16))
    np.testing.assert_allclose(got.astype(np.float32), written[enc.name], rtol=1e-3, atol=1e-4)


def test_tiles_pixels_and_several_encoders_in_one_commit(tmp_path, tiling):
    store = Store.create(tmp_path / "s")
    encs = [make_encoder("a", 8), make_encoder("b", 12)]
    commit_random_slide(store, 1, tiling, encs, 40, pixels=True)
    sid = make_slide(1).slide_id
    tiles = store.read_tiles(tiling.id, sid)
    assert tiles.column("tile_index").to_pylist() == list(range(40))
    assert {es.encoder_name for es in store.embedding_sets()} == {"a", "b"}
    assert store.read_pixels(tiling.id, sid).shape == (40, 8, 8, 3)
    assert store.read_pixels(tiling.id, sid, np.array([3, 1])).shape == (2, 8, 8, 3)
    assert len(list((tmp_path / "s" / "commits").iterdir())) == 2, "genesis + one commit for the slide"


def test_read_by_tile_ids_keeps_order_across_slides(tmp_path, tiling):
    store = Store.create(tmp_path / "s")
    enc = make_encoder()
    written = {i: commit_random_slide(store, i, tiling, [enc], 30 + i, dtype="float32")[enc.name]
               for i in range(3)}
    tiles = store.sql("SELECT tile_id, slide_id, tile_index FROM tiles ORDER BY hash(tile_id) LIMIT 25").to_pylist()
    got = store.read_by_tile_ids(store.embedding_set(enc.name), [t["tile_id"] for t in tiles])
    expected = np.stack([written[int(t["slide_id"], 16)][t["tile_index"]] for t in tiles])
    assert np.array_equal(got, expected)
    with pytest.raises(KeyError, match="tile ids not in"):
        store.read_by_tile_ids(store.embedding_set(enc.name), [12345])


def test_one_bag_of_a_100k_tile_store_reads_one_array(tmp_path, tiling, monkeypatch):
    store = Store.create(tmp_path / "s")
    enc = make_encoder(dim=8)
    for i in range(20):
        commit_random_slide(store, i, tiling, [enc], 5000)
    assert store.info().tiles == 100_000
    opened: list[Path] = []
    real_open = _arrays.open_array
    monkeypatch.setattr(snapshot_module._arrays, "open_array", lambda p: opened.append(p) or real_open(p))
    bag = store.read_bag(store.embedding_set(enc.name), make_slide(7).slide_id)
    assert bag.shape == (5000, 8)
    assert len(opened) == 1
    sizes = sum(f.stat().st_size for f in opened[0].rglob("*") if f.is_file())
    assert sizes < 5000 * 8 * 2 * 1.2, "a bag's array holds that slide only"


def test_iter_bags_streams_every_slide_once(tmp_path, tiling):
    store = Store.create(tmp_path / "s")
    enc = make_encoder()
    for i in range(4):
        commit_random_slide(store, i, tiling, [enc], 10 + i)
    seen = [(sid, tiles.num_rows, emb.shape[0]) for sid, tiles, emb in store.iter_bags(store.embedding_set("test/enc"))]
    assert [s for s, _, _ in seen] == sorted(make_slide(i).slide_id for i in range(4))
    assert all(n == m for _, n, m in seen)


def test_rewriting_a_slide_replaces_it(tmp_path, tiling):
    store = Store.create(tmp_path / "s")
    enc = make_encoder()
    commit_random_slide(store, 1, tiling, [enc], 10, seed=1)
    second = commit_random_slide(store, 1, tiling, [enc], 12, seed=2)
    assert store.info().tiles == 12 and store.info().slides == 1
    assert store.sql("SELECT count(*) AS n FROM bags").column("n")[0].as_py() == 1
    es = store.embedding_set(enc.name)
    assert np.array_equal(store.read_bag(es, make_slide(1).slide_id), second[enc.name].astype(np.float16))


def test_adding_an_encoder_to_existing_tiles(tmp_path, tiling):
    store = Store.create(tmp_path / "s")
    commit_random_slide(store, 1, tiling, [make_encoder("a")], 10)
    slide = make_slide(1)
    new = make_encoder("b", 4)
    store.commit_slide(SlideCommit(slide, tiling, None, {new: np.ones((10, 4), np.float32)}))
    assert store.embedding_set("b").id in store.progress(tiling.id)[slide.slide_id]
    assert store.info().tiles == 10
    with pytest.raises(InvalidRecordError, match="expected"):
        store.commit_slide(SlideCommit(slide, tiling, None, {new: np.ones((9, 4), np.float32)}))
    with pytest.raises(InvalidRecordError, match="not yet tiled"):
        store.commit_slide(SlideCommit(make_slide(2), tiling, None, {new: np.ones((9, 4), np.float32)}))


def test_progress_tracks_tiling_and_encoder(tmp_path, tiling):
    store = Store.create(tmp_path / "s")
    enc = make_encoder()
    commit_random_slide(store, 1, tiling, [enc], 5)
    commit_random_slide(store, 2, tiling, [], 5)
    assert store.progress(tiling.id) == {make_slide(1).slide_id: frozenset({store.embedding_set(enc.name).id}),
                                         make_slide(2).slide_id: frozenset()}
    assert store.progress(TilingSpec(1.0, 224).id) == {}


def test_read_only_handle_refuses_writes(tmp_path, tiling):
    Store.create(tmp_path / "s")
    ro = Store.open(tmp_path / "s", read_only=True)
    with pytest.raises(ReadOnlyError, match="read-only"):
        commit_random_slide(ro, 1, tiling, [make_encoder()], 5)
    with pytest.raises(ReadOnlyError):
        ro.import_labels(tmp_path / "x.csv")


KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from featurestore.store import Store, _commit
    from tests.conftest import commit_random_slide, make_encoder
    from featurestore.schemas import TilingSpec

    store = Store.open(sys.argv[1])
    real_rename = os.rename

    def stall(src, dst):
        Path(sys.argv[2]).write_text(str(src))
        time.sleep(120)
        real_rename(src, dst)

    _commit.os.rename = stall
    commit_random_slide(store, 2, TilingSpec(0.5, 224), [make_encoder()], 50, pixels=True)
""")


def test_writer_killed_between_array_write_and_commit(tmp_path, tiling):
    path = tmp_path / "s"
    store = Store.create(path)
    enc = make_encoder()
    first = commit_random_slide(store, 1, tiling, [enc], 20, dtype="float32")
    signal_file = tmp_path / "staged"
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), str(signal_file)], cwd=REPO,
                             env=os.environ | {"PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 60
        while not signal_file.exists():
            assert child.poll() is None, "writer exited before staging its commit"
            assert time.monotonic() < deadline, "writer never reached the commit"
            time.sleep(0.05)
        staged = Path(signal_file.read_text())
        assert (staged / "emb").is_dir() and (staged / "tiles.parquet").is_file(), "arrays and tables were staged"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()

    store = Store.open(path)
    info = store.info()
    assert (info.slides, info.tiles, info.staging) == (1, 20, 1)
    assert np.array_equal(store.read_bag(store.embedding_set(enc.name), make_slide(1).slide_id), first[enc.name])
    commit_random_slide(store, 2, tiling, [enc], 50, pixels=True)
    assert store.info().slides == 2 and store.info().tiles == 70
    assert store.vacuum(older_than_s=0).staging == 1
    assert store.info().staging == 0
