"""The commit log, snapshots, checkpoints, integrity checks, pushdown, vacuum and migration."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from featurestore.schemas import StoreDamageError, StoreVersionError, StoreWriteError
from featurestore.store import Snapshot, Store, StoreDamageWarning, migrate
from featurestore.store import _maintenance as maintenance_module
from featurestore.store import store as store_module
from tests.conftest import commit_random_slide, make_encoder, make_slide

REPO = Path(__file__).resolve().parents[1]


def counts(snap: Store | Snapshot, view: str = "emb_test_enc") -> tuple[int, int, int, int]:
    """Four ways of counting one snapshot's tiles and slides; they agree in any consistent state."""
    row = snap.sql(f"SELECT (SELECT coalesce(sum(n_tiles), 0) FROM bags) AS bag_tiles, "
                   f"(SELECT count(*) FROM tiles) AS tiles, (SELECT count(*) FROM {view}) AS vectors, "
                   f"(SELECT count(*) FROM slides) AS slides").to_pylist()[0]
    return row["bag_tiles"], row["tiles"], row["vectors"], row["slides"]


def test_versions_are_gap_free_and_a_snapshot_stays_pinned(tmp_path, tiling):
    store = Store.create(tmp_path / "s")
    enc = make_encoder()
    commit_random_slide(store, 1, tiling, [enc], 10)
    pinned = store.snapshot()
    commit_random_slide(store, 2, tiling, [enc], 20)
    names = sorted(p.name for p in (tmp_path / "s" / "log").iterdir())
    assert names == [f"{v:020d}.json" for v in range(len(names))], "one entry per version, no gap"
    assert counts(pinned) == (10, 10, 10, 1), "an older snapshot keeps its version"
    assert counts(store) == (30, 30, 30, 2)
    assert pinned.read_bag(pinned.embedding_set("test/enc"), make_slide(1).slide_id).shape == (10, 16)
    with pytest.raises(KeyError):
        pinned.read_bag(pinned.embedding_set("test/enc"), make_slide(2).slide_id)


def test_checkpoint_folds_history_without_changing_any_answer(tmp_path, tiling, monkeypatch):
    monkeypatch.setattr(store_module, "CHECKPOINT_EVERY", 4)
    store = Store.create(tmp_path / "s")
    enc = make_encoder()
    for i in range(9):
        commit_random_slide(store, i, tiling, [enc], 5 + i)
    commit_random_slide(store, 3, tiling, [enc], 7, seed=5)  # re-written: its old tiles must not come back
    store.import_labels(_labels(tmp_path, store), key="slide_id")
    snap = store.snapshot()
    assert snap.state.checkpoint is not None and snap.state.checkpoint.version % 4 == 0, "writers checkpoint"
    assert len(snap.state.entries) < 4, "a snapshot reads only the commits after the checkpoint"
    full = Snapshot(store._resolver.resolve(use_checkpoint=False))
    query = ("SELECT slide_id, count(*) AS n, sum(x) AS sx, max(l.grade) AS g FROM tiles "
             "LEFT JOIN labels l USING (slide_id) GROUP BY 1 ORDER BY 1")
    assert snap.sql(query) == full.sql(query)
    assert counts(snap) == counts(full) == (sum(5 + i for i in range(9)) - 8 + 7,) * 3 + (9,)
    parts = len(snap.state.checkpoint.parts["tiles"])
    report = store.compact()
    after = Store.open(tmp_path / "s").snapshot().state.checkpoint.parts
    assert parts >= 1 and all(len(p) == 1 for p in after.values()) and report.parts_after == len(after)
    assert store.sql(query) == full.sql(query)


def _labels(tmp_path: Path, store: Store) -> Path:
    path = tmp_path / "labels.csv"
    ids = [s.slide_id for s in store.slides()]
    path.write_text("slide_id,grade\n" + "".join(f"{s},{i % 3}\n" for i, s in enumerate(sorted(ids))))
    return path


def test_table_parts_stay_logarithmic(tmp_path, tiling, monkeypatch):
    monkeypatch.setattr(store_module, "CHECKPOINT_EVERY", 2)
    store = Store.create(tmp_path / "s")
    enc = make_encoder(dim=4)
    for i in range(32):
        commit_random_slide(store, i, tiling, [enc], 3)
    for name, parts in store.snapshot().state.checkpoint.parts.items():
        assert len(parts) <= 5, f"{name}: {len(parts)} parts after 16 checkpoints: the binary counter did not merge"
    assert store.sql("SELECT count(*) AS n FROM tiles").column("n")[0].as_py() == 96


def test_embedding_views_are_listed_and_filters_on_slides_read_only_their_arrays(tmp_path, tiling, monkeypatch):
    store = Store.create(tmp_path / "s")
    enc = make_encoder()
    written = {make_slide(i).slide_id: commit_random_slide(store, i, tiling, [enc], 30)["test/enc"] for i in range(6)}
    store.import_labels(_labels(tmp_path, store), key="slide_id")
    tables = set(store.sql("SHOW TABLES").column(0).to_pylist())
    assert {"emb_test_enc", "slide_emb_test_enc", "tiles", "labels"} <= tables
    reads: list[str] = []
    real = Snapshot.read_bag
    monkeypatch.setattr(Snapshot, "read_bag", lambda self, es, sid: reads.append(sid) or real(self, es, sid))
    sid = sorted(written)[2]
    assert store.sql("SELECT count(*) AS n FROM emb_test_enc").column("n")[0].as_py() == 180
    assert reads == [], "counting rows reads no array"
    got = store.sql("SELECT tile_index, embedding FROM emb_test_enc WHERE slide_id = ? ORDER BY tile_index", [sid])
    assert np.allclose(np.array(got.column("embedding").to_pylist()), written[sid].astype(np.float16), atol=1e-6)
    assert set(reads) == {sid}
    reads.clear()
    two = sorted(written)[1:3]
    got = Store.open(tmp_path / "s").sql(
        f"SELECT slide_id, count(*) AS n FROM emb_test_enc WHERE slide_id IN ('{two[0]}', '{two[1]}') "
        "AND embedding[1] IS NOT NULL GROUP BY 1")
    assert sorted(got.column("slide_id").to_pylist()) == two and set(reads) == set(two)
    got = store.sql("SELECT e.slide_id, sum(e.embedding[1]) AS s FROM emb_test_enc e JOIN labels l "
                    "USING (slide_id) WHERE l.grade = 1 GROUP BY 1 ORDER BY 1")
    graded = sorted(store.sql("SELECT slide_id FROM labels WHERE grade = 1").column(0).to_pylist())
    assert got.column("slide_id").to_pylist() == graded
    assert np.allclose(got.column("s").to_pylist(),
                       [written[s].astype(np.float16)[:, 0].astype(np.float64).sum() for s in graded], atol=1e-3)
    means = store.sql("SELECT slide_id, embedding FROM slide_emb_test_enc WHERE slide_id = ?", [sid])
    assert np.allclose(means.column("embedding").to_pylist()[0],
                       written[sid].astype(np.float16).astype(np.float32).mean(0), atol=1e-5)


def _shard(store_root: Path, slide: int) -> Path:
    snap = Store.open(store_root).snapshot()
    commit = snap.bag_commits(snap.embedding_set("test/enc"))[make_slide(slide).slide_id]
    return next(p for p in (store_root / "commits" / commit / "emb").rglob("*") if p.is_file()
                and p.name != "zarr.json")


def test_a_missing_shard_is_an_error_naming_the_slide_never_zeros(tmp_path, tiling):
    store = Store.create(tmp_path / "s")
    enc = make_encoder()
    for i in range(3):
        commit_random_slide(store, i, tiling, [enc], 12)
    _shard(tmp_path / "s", 1).unlink()
    store = Store.open(tmp_path / "s")
    es = store.embedding_set("test/enc")
    with pytest.raises(StoreDamageError, match=f"slide {make_slide(1).slide_id}.*fs verify"):
        store.read_bag(es, make_slide(1).slide_id)
    with pytest.raises(StoreDamageError, match="missing"):
        store.sql("SELECT sum(embedding[1]) FROM emb_test_enc")
    other = store.sql("SELECT count(*) AS n, sum(embedding[1]) AS s FROM emb_test_enc WHERE slide_id = ?",
                      [make_slide(2).slide_id])
    assert other.column("n")[0].as_py() == 12, "other slides stay readable"
    report = store.verify()
    assert [p.slides for p in report.problems] == [(make_slide(1).slide_id,)]
    store.drop_commits([p.commit_id for p in report.problems])
    assert make_slide(1).slide_id not in {s.slide_id for s in store.slides()}
    assert not store.verify().problems
    commit_random_slide(store, 1, tiling, [enc], 12)
    assert counts(store) == (36, 36, 36, 3), "a dropped slide can be written again"


def test_a_truncated_table_file_leaves_the_rest_of_the_store_usable(tmp_path, tiling):
    store = Store.create(tmp_path / "s")
    enc = make_encoder()
    for i in range(3):
        commit_random_slide(store, i, tiling, [enc], 8)
    snap = store.snapshot()
    commit = snap.bag_commits(snap.embedding_set("test/enc"))[make_slide(1).slide_id]
    path = tmp_path / "s" / "commits" / commit / "tiles.parquet"
    path.write_bytes(path.read_bytes()[:100])
    reopened = Store.open(tmp_path / "s")
    with pytest.warns(StoreDamageWarning, match="tiles.parquet.*fs verify"):
        assert counts(reopened) == (16, 16, 16, 2)
    assert [p.path for p in reopened.verify().problems] == [path]


def test_deep_verify_finds_a_flipped_byte(tmp_path, tiling):
    store = Store.create(tmp_path / "s")
    commit_random_slide(store, 0, tiling, [make_encoder()], 20)
    shard = _shard(tmp_path / "s", 0)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert not store.verify().problems, "same size: the cheap check cannot see it"
    problems = store.verify(deep=True).problems
    assert len(problems) == 1 and problems[0].path == shard and "checksum" in problems[0].problem


def test_vacuum_removes_only_what_no_snapshot_uses(tmp_path, tiling):
    store = Store.create(tmp_path / "s")
    enc = make_encoder()
    commit_random_slide(store, 0, tiling, [enc], 10, seed=1)
    first = store.snapshot().bag_commits(store.embedding_set("test/enc"))[make_slide(0).slide_id]
    rewritten = commit_random_slide(store, 0, tiling, [enc], 10, seed=2)["test/enc"]
    commit_random_slide(store, 1, tiling, [enc], 10)
    (tmp_path / "s" / "commits" / "00000000000000000001-deadbeef").mkdir()  # a writer died before its log entry
    (tmp_path / "s" / "staging" / "leftover").mkdir()
    store.compact()
    kept = store.vacuum(older_than_s=3600)
    assert (kept.staging, kept.unpublished_commits, kept.superseded_arrays) == (0, 0, 0), "too young to go"
    replaced = sum(f.stat().st_size for f in (tmp_path / "s" / "commits" / first / "emb").rglob("*") if f.is_file())
    report = store.vacuum(older_than_s=0)
    assert (report.staging, report.unpublished_commits, report.superseded_arrays) == (1, 1, 1)
    assert report.bytes_freed >= replaced > 0, "the replaced array's bytes are counted as freed"
    assert not any((tmp_path / "s" / "commits" / first / "emb").iterdir()), "the replaced bag's array is gone"
    assert np.allclose(store.read_bag(store.embedding_set("test/enc"), make_slide(0).slide_id),
                       rewritten, atol=1e-2)
    assert not store.verify(deep=True).problems, "vacuumed files are not damage"
    assert counts(store) == (20, 20, 20, 2)


def _as_format_1(root: Path) -> None:
    """Turn a store into the format-1 layout: commit directories only, no log, manifests or checkpoints."""
    for name in ("log", "checkpoints", "parts"):
        shutil.rmtree(root / name, ignore_errors=True)
    for manifest in (root / "commits").glob("*/_manifest.json"):
        manifest.unlink()
    marker = json.loads((root / "featurestore.json").read_text())
    (root / "featurestore.json").write_text(json.dumps(marker | {"format_version": 1}))


def test_migrate_upgrades_a_format_1_store_and_survives_a_crash(tmp_path, tiling, monkeypatch):
    store = Store.create(tmp_path / "s")
    enc = make_encoder()
    for i in range(4):
        commit_random_slide(store, i, tiling, [enc], 6 + i)
    before = store.sql("SELECT slide_id, tile_index, embedding FROM emb_test_enc ORDER BY ALL")
    _as_format_1(tmp_path / "s")
    with pytest.raises(StoreVersionError, match="fs migrate"):
        Store.open(tmp_path / "s")

    def crash(src, dst):
        raise OSError("simulated crash before the log is in place")

    with monkeypatch.context() as m:
        m.setattr(maintenance_module.os, "rename", crash)
        with pytest.raises(OSError, match="simulated"):
            migrate(tmp_path / "s")
    with pytest.raises(StoreVersionError, match="fs migrate"):
        Store.open(tmp_path / "s")
    report = migrate(tmp_path / "s")
    assert (report.from_version, report.to_version, report.commits_logged) == (1, 3, 5)
    migrated = Store.open(tmp_path / "s")
    assert migrated.sql("SELECT slide_id, tile_index, embedding FROM emb_test_enc ORDER BY ALL") == before
    assert not migrated.verify(deep=True).problems
    commit_random_slide(migrated, 9, tiling, [enc], 3)
    assert counts(migrated)[3] == 5


def test_malformed_format_versions_are_refused_with_the_fix(tmp_path):
    Store.create(tmp_path / "s")
    marker = tmp_path / "s" / "featurestore.json"
    good = json.loads(marker.read_text())
    for bad in ("abc", None, [2], 1.5):
        marker.write_text(json.dumps(good | {"format_version": bad}))
        with pytest.raises(Exception, match="format_version") as err:
            Store.open(tmp_path / "s")
        assert "backup" in str(err.value)


WRITER = textwrap.dedent("""
    import sys
    import time
    from featurestore.store import Store
    from featurestore.schemas import TilingSpec
    from tests.conftest import commit_random_slide, make_encoder

    store = Store.open(sys.argv[1])
    for i in range(int(sys.argv[2]), int(sys.argv[3])):
        commit_random_slide(store, i, TilingSpec(0.5, 224), [make_encoder(dim=8)], 5 + i % 7)
        time.sleep(0.1)  # leave the reader time to interleave on a 2-core machine
""")


def test_four_writers_a_reader_and_a_checkpoint(tmp_path, tiling):
    """Every statement sees one consistent version; nothing is lost; the result equals a serial run."""
    path = tmp_path / "s"
    store = Store.create(path)
    env = os.environ | {"PYTHONPATH": str(REPO)}
    per = 20
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(w * per), str((w + 1) * per)],
                                cwd=REPO, env=env) for w in range(4)]
    reader = Store.open(path, read_only=True)
    seen, checkpointed = [], False
    while any(w.poll() is None for w in writers):
        if reader.sql("SELECT count(*) FROM embedding_sets").column(0)[0].as_py():
            bag_tiles, tiles, vectors, slides = counts(reader, "emb_test_enc")
            assert bag_tiles == tiles == vectors, f"torn read: {bag_tiles} {tiles} {vectors}"
            seen.append(slides)
        if not checkpointed and len(seen) >= 2:
            store.checkpoint()
            checkpointed = True
    assert all(w.returncode == 0 for w in writers)
    assert checkpointed and len(seen) >= 4, f"the reader ran {len(seen)} statements during the writes"
    assert seen == sorted(seen), "a reader never goes back in time"
    serial = Store.create(tmp_path / "serial")
    for i in range(4 * per):
        commit_random_slide(serial, i, tiling, [make_encoder(dim=8)], 5 + i % 7)
    query = "SELECT slide_id, tile_index, tile_id, x, y, embedding FROM emb_test_enc ORDER BY ALL"
    assert Store.open(path).sql(query) == serial.sql(query)
    assert not Store.open(path).verify(deep=True).problems


FULL_DISK_WRITER = textwrap.dedent("""
    import resource, sys
    from featurestore.store import Store
    from featurestore.schemas import StoreWriteError, TilingSpec
    from tests.conftest import commit_random_slide, make_encoder

    store = Store.open(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
    try:
        commit_random_slide(store, 5, TilingSpec(0.5, 224), [make_encoder()], 4000, pixels=True)
    except StoreWriteError as err:
        print(err)
        sys.exit(3)
""")


@pytest.mark.parametrize("limit", [2_000, 200_000])
def test_a_full_disk_leaves_the_store_as_it_was(tmp_path, tiling, limit):
    """Under a file-size limit (what a full disk looks like to a writer) the commit fails cleanly."""
    store = Store.create(tmp_path / "s")
    commit_random_slide(store, 1, tiling, [make_encoder()], 10)
    before = counts(store)
    child = subprocess.run([sys.executable, "-c", FULL_DISK_WRITER, str(tmp_path / "s"), str(limit)], cwd=REPO,
                           env=os.environ | {"PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert child.returncode == 3, child.stderr
    assert f"{tmp_path / 's'}: cannot write to the store (File too large)" in child.stdout
    assert "Traceback" not in child.stdout
    reopened = Store.open(tmp_path / "s")
    assert counts(reopened) == before and not any((tmp_path / "s" / "staging").iterdir())
    commit_random_slide(reopened, 5, tiling, [make_encoder()], 40, pixels=True)
    assert counts(reopened)[3] == 2, "the next run finishes the work"


def test_vacuum_keeps_every_file_a_retained_checkpoint_names(tmp_path, tiling, monkeypatch):
    from featurestore.store._snapshot import _checked_checkpoint

    monkeypatch.setattr(store_module, "CHECKPOINT_EVERY", 2)
    store = Store.create(tmp_path / "s")
    for i in range(9):
        commit_random_slide(store, i, tiling, [make_encoder(dim=4)], 3)
    expected = counts(store)
    versions = [int(p.name) for p in (tmp_path / "s" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(versions) >= 4
    store.vacuum(older_than_s=3600)
    assert all(_checked_checkpoint(tmp_path / "s", v) is not None for v in versions), "young checkpoints intact"
    report = store.vacuum(older_than_s=0)
    assert report.checkpoints == len(versions) - 1 and report.parts >= 1
    assert counts(Store.open(tmp_path / "s")) == expected


def test_the_newest_version_is_found_without_walking_the_log(tmp_path, tiling, monkeypatch):
    from featurestore.store import _log

    store = Store.create(tmp_path / "s")
    for i in range(40):
        commit_random_slide(store, i, tiling, [make_encoder(dim=4)], 2)
    probes: list[int] = []
    real = _log.exists
    monkeypatch.setattr(_log, "exists", lambda root, v: probes.append(v) or real(root, v))
    assert Store.open(tmp_path / "s").snapshot().version == 40
    assert len(probes) <= 2 * 6 + 2, f"{len(probes)} stats to find version 40 from scratch"


@pytest.mark.parametrize("errno_", [errno.EROFS, errno.EACCES, errno.ENOSPC])
@pytest.mark.parametrize("step", ["stage", "publish"])
def test_an_injected_disk_error_aborts_the_commit_with_one_line(tmp_path, tiling, monkeypatch, errno_, step):
    """Read-only filesystem, permission denied and a full disk, injected where a commit writes."""
    from featurestore.store import _commit

    store = Store.create(tmp_path / "s")
    commit_random_slide(store, 1, tiling, [make_encoder()], 10)
    before = counts(store)

    def refuse(*args, **kwargs):
        raise OSError(errno_, os.strerror(errno_))

    if step == "stage":
        monkeypatch.setattr(_commit._arrays, "write_embeddings", refuse)
    else:
        monkeypatch.setattr(_commit.os, "rename", refuse)
    with pytest.raises(StoreWriteError, match=f"{tmp_path / 's'}: cannot write to the store \\({os.strerror(errno_)}"):
        commit_random_slide(store, 2, tiling, [make_encoder()], 10)
    monkeypatch.undo()
    assert counts(Store.open(tmp_path / "s")) == before
    assert not any((tmp_path / "s" / "staging").iterdir()), "the aborted transaction left nothing behind"
