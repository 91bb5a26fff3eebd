"""Stage one end to end on generated slides: embeddings, resume, kills, failures, Dask."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from featurestore.encoders import build_teacher
from featurestore.pipelines.demo import make_cohort
from featurestore.pipelines.extract import ExtractOptions, PixelSpec, dry_run_counts, extract_slide, run_extract
from featurestore.schemas import FsError, ModelError, TilingSpec
from featurestore.slides import open_slide, read_tiles, tile_grid, tissue_mask
from featurestore.store import Store

REPO = Path(__file__).resolve().parents[1]
TEACHER = "test/tiny-cnn"
TILING = TilingSpec(target_mpp=0.5, tile_size=224)


def opts(*models: str, **kw) -> ExtractOptions:
    return ExtractOptions(models=models or (TEACHER,), tiling=TILING, device="cpu", batch_size=16, qc=True, **kw)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), 3, size=2048, seed=1)


@pytest.fixture(scope="module")
def clean_store(cohort, tmp_path_factory):
    """One uninterrupted in-process extraction: the reference the other runs must equal."""
    path = tmp_path_factory.mktemp("clean") / "store"
    report = run_extract([cohort.root / "slides"], path, opts())
    assert not report.failed, [o.error for o in report.failed]
    return Store.open(path, read_only=True)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """The test teacher's tensors as a checkpoint, so its spec is the file's hash rather than a build's."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "tiny_cnn.safetensors"
    save_file(build_teacher(TEACHER).backbone.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def file_store(cohort, weights_file, tmp_path_factory) -> Path:
    """A finished extraction with the checkpoint teacher."""
    path = tmp_path_factory.mktemp("file") / "store"
    report = run_extract([cohort.root / "slides"], path, opts(weights={TEACHER: str(weights_file)}))
    assert not report.failed, [o.error for o in report.failed]
    return path


@pytest.fixture
def builds(monkeypatch) -> list[str]:
    """Names of the teachers built from here on; this process's teacher and spec caches start empty."""
    import featurestore.encoders
    import featurestore.pipelines.extract

    built: list[str] = []
    real = featurestore.encoders.build_teacher

    def build(name: str, **kw):
        built.append(name)
        return real(name, **kw)

    monkeypatch.setattr(featurestore.encoders, "build_teacher", build)
    monkeypatch.setattr(featurestore.pipelines.extract, "_TEACHERS", {})
    monkeypatch.setattr(featurestore.pipelines.extract, "_SPECS", {})
    return built


def snapshot(store: Store, model: str = TEACHER) -> dict[str, tuple]:
    """Everything a user reads back, keyed by slide: tile coordinates and embeddings."""
    es = store.embedding_set(model)
    out = {}
    for slide_id, tiles, emb in store.iter_bags(es):
        out[slide_id] = (tiles.column("x").to_pylist(), tiles.column("y").to_pylist(), emb.tobytes())
    return out


def assert_same_content(got_store: Store, want_store: Store) -> None:
    """Same slides, identical tiles, embeddings equal up to the last float16 bit.

    Another process may run torch with another thread count, which reorders float sums.
    """
    got, want = snapshot(got_store), snapshot(want_store)
    assert got.keys() == want.keys()
    for sid, (x, y, emb) in got.items():
        assert (x, y) == want[sid][:2]
        np.testing.assert_allclose(np.frombuffer(emb, np.float16), np.frombuffer(want[sid][2], np.float16),
                                   rtol=2e-3, atol=1e-4)


def test_extract_writes_tiles_embeddings_qc_and_run(clean_store, cohort):
    info = clean_store.info()
    assert info.slides == 3 and info.failures == 0
    assert info.tiles > 30
    [emb] = info.embedding_sets
    assert (emb.view, emb.slides, emb.tiles) == ("emb_test_tiny_cnn", 3, info.tiles)
    assert len(list((clean_store.root / "qc").glob("*.png"))) == 3
    run = clean_store.runs()[-1]
    assert run.status == "ok" and run.finished_at is not None and "torch" in run.versions
    slides = clean_store.sql("SELECT path, mpp_x, mpp_assumed, vendor FROM slides").to_pylist()
    assert all(s["mpp_x"] == pytest.approx(0.5) and not s["mpp_assumed"] for s in slides)


def test_pipeline_embeddings_equal_a_direct_model_call(clean_store):
    teacher = build_teacher(TEACHER, device="cpu")
    es = clean_store.embedding_set(TEACHER)
    slide = clean_store.slides()[0]
    tiles = clean_store.read_tiles(TILING.id, slide.slide_id)
    with open_slide(slide.path) as reader:
        grid = tile_grid(reader, TILING, tissue_mask(reader, TILING, mpp=slide.mpp_x), mpp=slide.mpp_x)
        grid = grid.with_coordinates(tiles.column("x").to_numpy(), tiles.column("y").to_numpy())
        pixels = read_tiles(reader, grid, np.arange(len(grid)), TILING.tile_size)
    with torch.inference_mode():
        direct = teacher(torch.from_numpy(pixels)).numpy()
    stored = clean_store.read_bag(es, slide.slide_id).astype(np.float32)
    np.testing.assert_allclose(stored, direct, rtol=1e-3, atol=1e-3)
    assert np.array_equal(stored, direct.astype(np.float16).astype(np.float32))


def test_rerun_skips_and_new_model_runs_only_on_existing_tiles(cohort, clean_store, tmp_path, builds):
    path = tmp_path / "store"
    shutil.copytree(clean_store.root, path)
    again = run_extract([cohort.root / "slides"], path, opts())
    assert [o.status for o in again.outcomes] == ["skipped"] * 3
    assert builds == [TEACHER], "seeded weights are identified by building them, once"
    tile_commits = Store.open(path).sql("SELECT DISTINCT commit_id FROM tiles ORDER BY 1").to_pylist()
    more = run_extract([cohort.root / "slides"], path, opts(TEACHER, "test/tiny-vit"))
    assert [o.models for o in more.outcomes] == [("test/tiny-vit",)] * 3
    assert builds == [TEACHER, "test/tiny-vit"]
    store = Store.open(path)
    assert store.sql("SELECT DISTINCT commit_id FROM tiles ORDER BY 1").to_pylist() == tile_commits
    assert snapshot(store) == snapshot(clean_store)
    assert store.info().embedding_sets[1].tiles == store.info().tiles


def test_rerun_of_a_finished_store_builds_no_teacher(cohort, file_store, weights_file, tmp_path, builds):
    path = tmp_path / "store"
    shutil.copytree(file_store, path)
    o = opts(weights={TEACHER: str(weights_file)})
    again = run_extract([cohort.root / "slides"], path, o)
    assert [x.status for x in again.outcomes] == ["skipped"] * 3
    store = Store.open(path)
    slide = store.slides()[0]
    done = store.progress(TILING.id)[slide.slide_id]
    assert extract_slide(store, Path(slide.path), slide.slide_id, o, done).status == "skipped", \
        "a Dask worker decides the same way"
    assert builds == []
    runs = len(store.runs())
    with pytest.raises(ModelError, match="does not exist"):
        run_extract([cohort.root / "slides"], path, opts(weights={TEACHER: str(tmp_path / "absent.pt")}))
    assert len(Store.open(path).runs()) == runs, "missing weights fail before anything is written"


def test_a_model_added_to_a_finished_store_is_the_only_one_built(cohort, file_store, weights_file, tmp_path,
                                                                  builds):
    path = tmp_path / "store"
    shutil.copytree(file_store, path)
    more = run_extract([cohort.root / "slides"], path, opts(TEACHER, "test/tiny-vit",
                                                            weights={TEACHER: str(weights_file)}))
    assert [x.models for x in more.outcomes] == [("test/tiny-vit",)] * 3
    assert builds == ["test/tiny-vit"]


def test_cache_pixels_on_a_finished_store_adds_only_the_pixels(cohort, file_store, weights_file, tmp_path, builds):
    path = tmp_path / "store"
    shutil.copytree(file_store, path)
    before = Store.open(path)
    es = before.embedding_set(TEACHER)
    bags = {s: before.read_bag(es, s) for s in before.snapshot().bag_commits(es)}
    o = opts(weights={TEACHER: str(weights_file)}, cache_pixels=(PixelSpec(224, 0.5), PixelSpec(224, 1.0)))
    report = run_extract([cohort.root / "slides"], path, o)
    assert [x.status for x in report.outcomes] == ["done"] * 3 and builds == [], "pixels only, no teacher"
    store = Store.open(path)
    for slide_id, bag in bags.items():
        tiles = store.read_tiles(TILING.id, slide_id)
        assert store.read_pixels(TILING.id, slide_id).shape == (tiles.num_rows, 224, 224, 3)
        assert np.array_equal(store.read_bag(es, slide_id), bag), "embeddings untouched"
    coarser = store.info().tilings[1]
    assert len(store.tilings()) == 2 and coarser.slides_with_pixels == 3, "the coarser tiling has pixels too"
    assert [x.status for x in run_extract([cohort.root / "slides"], path, o).outcomes] == ["skipped"] * 3


def test_teacher_views_cache_dihedral_embeddings(cohort, clean_store, tmp_path):
    from featurestore.encoders.views import dihedral

    path = tmp_path / "store"
    shutil.copytree(clean_store.root, path)
    report = run_extract([cohort.root / "slides"], path, opts(teacher_views=2))
    assert [o.models for o in report.outcomes] == [(TEACHER,)] * 3, "a 2-view set is new work, not done work"
    store = Store.open(path)
    es = next(s for s in store.embedding_sets() if s.views == 2)
    slide = store.slides()[0]
    bag = store.read_bag(es, slide.slide_id)
    single = clean_store.read_bag(clean_store.embedding_set(TEACHER), slide.slide_id)
    assert bag.shape == (single.shape[0], 2, single.shape[1])
    assert np.array_equal(bag[:, 0], single), "view 0 is the tile itself"
    tiles = store.read_tiles(TILING.id, slide.slide_id)
    with open_slide(slide.path) as reader:
        grid = tile_grid(reader, TILING, tissue_mask(reader, TILING, mpp=slide.mpp_x), mpp=slide.mpp_x)
        grid = grid.with_coordinates(tiles.column("x").to_numpy(), tiles.column("y").to_numpy())
        pixels = torch.from_numpy(read_tiles(reader, grid, np.arange(4), TILING.tile_size))
    with torch.inference_mode():
        rotated = build_teacher(TEACHER, device="cpu")(dihedral(pixels, 1)).numpy()
    np.testing.assert_allclose(bag[:4, 1].astype(np.float32), rotated, rtol=1e-2, atol=1e-2)
    assert not np.allclose(bag[:4, 1], bag[:4, 0], atol=1e-2), "a rotated view embeds differently"
    with pytest.raises(FsError, match="teacher-views"):
        run_extract([cohort.root / "slides"], path, opts(teacher_views=9))


def test_several_teachers_share_one_tile_index(cohort, tmp_path):
    report = run_extract([cohort.root / "slides"], tmp_path / "s", opts(TEACHER, "test/tiny-vit"))
    assert all(o.models == (TEACHER, "test/tiny-vit") for o in report.outcomes)
    store = Store.open(tmp_path / "s")
    counts = store.sql("SELECT set_id, sum(n_tiles) AS n FROM bags GROUP BY set_id").column("n").to_pylist()
    assert counts == [store.info().tiles] * 2


def test_cached_pixels_at_two_magnifications_pair_exactly(cohort, tmp_path):
    o = opts(cache_pixels=(PixelSpec(224, 0.5), PixelSpec(224, 2.0)))
    run_extract([cohort.root / "slides"], tmp_path / "s", o)
    store = Store.open(tmp_path / "s")
    low = next(t for t in store.tilings() if t.target_mpp == 2.0)
    slide = store.slides()[0]
    hi_tiles = store.read_tiles(TILING.id, slide.slide_id)
    lo_tiles = store.read_tiles(low.id, slide.slide_id)
    assert store.read_pixels(TILING.id, slide.slide_id).shape == (hi_tiles.num_rows, 224, 224, 3)
    assert store.read_pixels(low.id, slide.slide_id).shape == (lo_tiles.num_rows, 224, 224, 3)
    footprint = 224  # level-0 px of one teacher tile: 224 px at 0.5 µm/px on a 0.5 µm/px slide
    lx, ly = lo_tiles.column("x").to_numpy(), lo_tiles.column("y").to_numpy()
    hx, hy = hi_tiles.column("x").to_numpy(), hi_tiles.column("y").to_numpy()
    assert np.all(lx % (4 * footprint) == 0) and np.all(ly % (4 * footprint) == 0)
    parents = {(x - x % (4 * footprint), y - y % (4 * footprint)) for x, y in zip(hx, hy, strict=True)}
    assert parents == set(zip(lx.tolist(), ly.tolist(), strict=True)), "every teacher tile has one coarse parent"
    with open_slide(slide.path) as reader:
        region = reader.read_region((int(lx[0]), int(ly[0])), 0, (4 * footprint, 4 * footprint))
    small = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(region).resize((224, 224)))
    got = store.read_pixels(low.id, slide.slide_id, np.array([0]))[0]
    assert np.abs(got.astype(int) - small.astype(int)).mean() < 3, "the coarse tile shows its footprint"


def write_plain_tiff(path: Path, rgb: np.ndarray, *, mpp: float | None) -> None:
    kw = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", compression="jpeg", **kw)


def test_bad_slides_are_recorded_and_the_rest_complete(cohort, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(cohort.root / "slides", folder)
    (folder / "corrupt.svs").write_bytes(os.urandom(5000))
    good = next(folder.glob("*.tiff"))
    (folder / "truncated.tiff").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    write_plain_tiff(folder / "blank.tiff", np.full((1024, 1024, 3), 245, np.uint8), mpp=0.5)
    (folder / "notes.ndpi").write_text("not a slide")
    report = run_extract([folder], tmp_path / "s", opts())
    by_name = {Path(o.path).name: o for o in report.outcomes}
    assert sum(o.status == "done" for o in report.outcomes) == 3
    assert {n for n, o in by_name.items() if o.status == "failed"} == {"corrupt.svs", "truncated.tiff",
                                                                        "blank.tiff", "notes.ndpi"}
    assert "tissue" in by_name["blank.tiff"].error
    store = Store.open(tmp_path / "s")
    failures = {Path(f.slide_path).name: f for f in store.failures()}
    assert set(failures) == {"corrupt.svs", "truncated.tiff", "blank.tiff", "notes.ndpi"}
    assert store.info().slides == 3 and store.runs()[-1].status == "failed"


def test_missing_mpp_is_refused_then_assumed(tmp_path, cohort):
    folder = tmp_path / "nompp"
    folder.mkdir()
    rgb = np.asarray(open_slide(cohort.slides[0].path).read_region((512, 512), 0, (1024, 1024)))
    write_plain_tiff(folder / "nompp.tiff", rgb, mpp=None)
    report = run_extract([folder], tmp_path / "s", opts())
    [failed] = report.failed
    assert "nompp.tiff" in failed.error and "--assume-mpp" in failed.error and "\n" not in failed.error
    report = run_extract([folder], tmp_path / "s", opts(assume_mpp=0.5))
    assert not report.failed
    [slide] = Store.open(tmp_path / "s").slides()
    assert slide.mpp_assumed and slide.mpp_x == 0.5


def test_renamed_and_copied_slides_are_recognised(cohort, clean_store, tmp_path):
    folder = tmp_path / "moved"
    folder.mkdir()
    first = cohort.slides[0].path
    shutil.copy(first, folder / "renamed.tiff")
    shutil.copy(first, folder / "copy.tiff")
    path = tmp_path / "store"
    shutil.copytree(clean_store.root, path)
    report = run_extract([folder], path, opts())
    assert [o.status for o in report.outcomes] == ["skipped"]
    assert len(report.duplicates) == 1


def test_dry_run_loads_no_model(cohort, monkeypatch):
    import featurestore.encoders

    monkeypatch.setattr(featurestore.encoders, "build_teacher", lambda *a, **k: pytest.fail("model built"))
    plan = dry_run_counts([cohort.root / "slides"], opts())
    assert len(plan) == 3 and all(p.tiles > 0 and not p.error for p in plan)


CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import featurestore.pipelines.extract as ex
    from featurestore.store import _commit
    from featurestore.schemas import TilingSpec

    slides, store, point, after, flag = sys.argv[1:6]
    after = int(after)
    calls = {"embed": 0, "publish": 0}

    def stall(kind):
        calls[kind] += 1
        if kind == point and calls[kind] > after:
            Path(flag).write_text("ready")
            time.sleep(300)

    real_embed, real_rename = ex.embed_batches, os.rename
    ex.embed_batches = lambda *a, **k: (stall("embed"), real_embed(*a, **k))[1]
    slide_commit = lambda s: (Path(s) / "slide_tilings.parquet").exists() and "genesis" not in str(s)
    _commit.os.rename = lambda s, d: (slide_commit(s) and stall("publish"), real_rename(s, d))[1]
    opts = ex.ExtractOptions(models=("test/tiny-cnn",), tiling=TilingSpec(0.5, 224), device="cpu", batch_size=16)
    ex.run_extract([slides], Path(store), opts)
""")


@pytest.mark.parametrize(("point", "after", "sig"), [
    ("embed", 0, signal.SIGKILL),    # first slide, before anything is committed
    ("publish", 1, signal.SIGKILL),  # second slide staged, not yet published
    ("embed", 2, signal.SIGKILL),    # two slides committed, third mid-way
    ("embed", 1, signal.SIGINT),     # Ctrl-C mid-slide
])
def test_killed_extraction_resumes_to_the_clean_result(cohort, clean_store, tmp_path, point, after, sig):
    path, flag = tmp_path / "store", tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(cohort.root / "slides"), str(path), point,
                              str(after), str(flag)], cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert child.poll() is None, "extraction ended before the kill point"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child.send_signal(sig)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    interrupted = Store.open(path)
    assert interrupted.info().slides == after
    if sig == signal.SIGINT:
        assert interrupted.info().staging == 0, "Ctrl-C cleans up its transaction"
    report = run_extract([cohort.root / "slides"], path, opts())
    assert not report.failed
    assert sum(o.status == "done" for o in report.outcomes) == 3 - after
    resumed = Store.open(path)
    assert_same_content(resumed, clean_store)
    assert resumed.info().tiles == clean_store.info().tiles
    assert resumed.sql("SELECT count(*) AS n FROM bags").column("n")[0].as_py() == 3


def test_dask_cluster_of_two_workers_equals_single_process(cohort, clean_store, tmp_path):
    bin_dir = Path(sys.executable).parent
    sched_file = tmp_path / "scheduler.json"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([bin_dir / "dask", "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(sched_file)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists():
            assert time.monotonic() < deadline, "dask scheduler did not start"
            time.sleep(0.1)
        for _ in range(2):
            procs.append(subprocess.Popen([bin_dir / "dask", "worker", "--scheduler-file", str(sched_file),
                                           "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"],
                                          env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        import json

        from dask.distributed import Client

        address = json.loads(sched_file.read_text())["address"]
        with Client(address) as client:
            client.wait_for_workers(2, timeout=60)
            workers = list(client.scheduler_info()["workers"])
        report = run_extract([cohort.root / "slides"], tmp_path / "s", opts(), scheduler=address)
        assert not report.failed and len(report.outcomes) == 3
        assert_same_content(Store.open(tmp_path / "s"), clean_store)
        assert len(workers) == 2
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_cli_extract_summary_dry_run_and_exit_code(cohort, tmp_path):
    from typer.testing import CliRunner

    from featurestore.cli.main import app

    runner = CliRunner()
    store = tmp_path / "s"
    dry = runner.invoke(app, ["extract", str(cohort.root / "slides"), "-s", str(store), "-m", TEACHER, "--dry-run"])
    assert dry.exit_code == 0 and "3 slides" in dry.output and not store.exists()
    ok = runner.invoke(app, ["extract", str(cohort.root / "slides"), "-s", str(store), "-m", TEACHER,
                             "--device", "cpu", "--batch-size", "8"])
    assert ok.exit_code == 0, ok.output
    assert "extract summary" in ok.output and "[3/3] done" in ok.output
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.svs").write_bytes(b"\0" * 100)
    bad = runner.invoke(app, ["extract", str(tmp_path / "bad"), "-s", str(store), "-m", TEACHER])
    assert bad.exit_code == 1 and "broken.svs" in bad.output
    unknown = runner.invoke(app, ["extract", str(cohort.root / "slides"), "-s", str(store), "-m", "nope"])
    assert unknown.exit_code == 2 and "nope" in unknown.output and len(unknown.output.strip().splitlines()) <= 2


@pytest.mark.parametrize(("args", "message"), [
    (["{missing}"], "no slides under .*do not exist"),
    (["{empty}"], "no slides under"),
    (["{slides}", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["{slides}", "--cache-pixels", "224@0.7"], "--cache-pixels 224@0.7: its field of view must be a whole multiple"),
    (["{slides}", "--assume-mpp", "-1"], "--assume-mpp -1.0: must be a positive"),
])
def test_bad_inputs_fail_before_anything_is_created(cohort, tmp_path, args, message):
    from typer.testing import CliRunner

    from featurestore.cli.main import app

    (tmp_path / "empty").mkdir()
    store = tmp_path / "store"
    filled = [a.format(missing=tmp_path / "nope", empty=tmp_path / "empty", slides=cohort.root / "slides")
              for a in args]
    result = CliRunner().invoke(app, ["extract", *filled, "-s", str(store), "-m", TEACHER])
    assert result.exit_code == 2, result.output
    text = result.output.replace("\n", "")
    assert re.search(message, text) and "Traceback" not in text
    assert not store.exists(), "nothing was created"


def test_a_plain_extraction_writes_nothing_to_home_and_prints_no_gpu_noise(cohort, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CUPY_CACHE_DIR"} | {"HOME": str(home),
                                                                              "PYTHONPATH": str(REPO)}
    child = subprocess.run([sys.executable, "-c", "from featurestore.cli.main import app; app()", "extract",
                            str(cohort.root / "slides"), "-s", str(tmp_path / "store"), "-m", TEACHER, "--device",
                            "cpu"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout + child.stderr
    assert Store.open(tmp_path / "store").info().slides == 3
    assert list(home.iterdir()) == [], "nothing written to $HOME"
    said = (child.stdout + child.stderr).lower()
    assert [w for w in ("cufile", "libcuda", "cuda driver", "traceback") if w in said] == [], said
    assert not (tmp_path / "cufile.log").exists()
