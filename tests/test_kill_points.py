"""A writer killed at its publish point in every write path; the re-run equals a clean run.

Each case runs one ``fs`` command in a child process whose publish step (a log append, an index
manifest write, a run-directory rename) ends the process on the spot, as SIGKILL would. The
store must read exactly as before, and running the command again must give what one
uninterrupted run gives.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from featurestore.cli.main import app
from featurestore.schemas import TilingSpec
from featurestore.store import Store
from tests.conftest import commit_random_slide, make_encoder, make_slide

REPO = Path(__file__).resolve().parents[1]

DIE_AT = textwrap.dedent("""
    import importlib, os, sys

    target, nth, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    owner, attr = target.rsplit(".", 1)
    try:
        holder = importlib.import_module(owner)
    except ModuleNotFoundError:
        module, cls = owner.rsplit(".", 1)
        holder = getattr(importlib.import_module(module), cls)
    real, calls = getattr(holder, attr), []

    def die(*a, **k):
        calls.append(1)
        if len(calls) >= nth:
            os._exit(9)
        return real(*a, **k)

    setattr(holder, attr, die)
    from featurestore.cli.main import app
    app(args)
""")


def killed(target: str, nth: int, *args: str) -> None:
    child = subprocess.run([sys.executable, "-c", DIE_AT, target, str(nth), *args], cwd=REPO, capture_output=True,
                           text=True, env=os.environ | {"PYTHONPATH": str(REPO)}, timeout=300)
    assert child.returncode == 9, f"the command never reached {target} #{nth}: {child.stdout}{child.stderr}"


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def snapshot_of(path: Path) -> dict[str, object]:
    """Everything a user can read: every table and every vector (timestamps and time-based ids aside)."""
    store = Store.open(path, read_only=True)
    tables = {}
    for t in ("slides", "tiles", "bags", "labels", "slide_embeddings", "imports"):
        table = store.sql(f"SELECT * EXCLUDE (commit_id) FROM {t} ORDER BY ALL")
        tables[t] = table.select([f.name for f in table.schema if not pa.types.is_timestamp(f.type)
                                  and not f.name.endswith(("commit_id", "run_id"))])
    for view in store.view_names():
        tables[view] = store.sql(f"SELECT * FROM {view} ORDER BY slide_id, tile_index")
    return tables


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("kill") / "store"
    store = Store.create(path)
    tiling = TilingSpec(target_mpp=0.5, tile_size=224)
    for i in range(6):
        commit_random_slide(store, i, tiling, [make_encoder("uni", 8)], 12 + i, dtype="float32")
    labels = path.parent / "labels.csv"
    labels.write_text("slide_id,label,patient\n" + "".join(
        f"{make_slide(i).slide_id},{i % 2},p{i}\n" for i in range(6)))
    return path, labels


def fresh(base, tmp_path) -> Path:
    path = tmp_path / "store"
    shutil.copytree(base[0], path)
    return path


def test_labels_import(base, tmp_path):
    path, clean = fresh(base, tmp_path), fresh(base, tmp_path / "c")
    before = snapshot_of(path)
    killed("featurestore.store._log.append", 1, "labels", "import", str(base[1]), "-s", str(path))
    assert snapshot_of(path) == before
    run("labels", "import", str(base[1]), "-s", str(path))
    run("labels", "import", str(base[1]), "-s", str(clean))
    assert snapshot_of(path) == snapshot_of(clean)


@pytest.mark.parametrize(("target", "nth"), [("featurestore.store._log.append", 1),
                                             ("featurestore.index._build.write_manifest", 1)])
def test_index_build(base, tmp_path, target, nth):
    path, clean = fresh(base, tmp_path), fresh(base, tmp_path / "c")
    before = snapshot_of(path)
    killed(target, nth, "index", "build", "-s", str(path), "-m", "uni")
    if target.endswith("write_manifest"):
        before = snapshot_of(path)  # the pooled vectors were committed before the manifest
    assert snapshot_of(path) == before
    run("index", "build", "-s", str(path), "-m", "uni")
    run("index", "build", "-s", str(clean), "-m", "uni")
    assert snapshot_of(path) == snapshot_of(clean)
    query = ("search", "-m", "uni", "--slide", make_slide(2).slide_id, "-f", "json")
    assert run(*query, "-s", str(path)) == run(*query, "-s", str(clean))


def test_import_of_feature_files(base, tmp_path):
    exported = tmp_path / "trident"
    run("export", str(exported), "-s", str(base[0]), "-m", "uni", "--layout", "trident")
    path, clean = tmp_path / "imported", tmp_path / "clean"
    args = ("import", str(exported), "--layout", "trident", "--assume-mpp", "0.5", "--model-name", "uni")
    killed("featurestore.store._log.append", 3, *args, "-s", str(path))
    run(*args, "-s", str(path))
    run(*args, "-s", str(clean))
    assert snapshot_of(path) == snapshot_of(clean)


def test_train_run_directory(base, tmp_path):
    path = fresh(base, tmp_path)
    run("labels", "import", str(base[1]), "-s", str(path))
    args = ("train", "-s", str(path), "-m", "uni", "--label", "label", "--task", "classification", "--head", "mean",
            "--folds", "2", "--epochs", "2", "--group", "patient", "--device", "cpu")
    killed("pathlib.Path.rename", 1, *args, "--out", str(tmp_path / "run"))
    assert not (tmp_path / "run").exists(), "no half-written run: only a hidden .run.partial-* staging directory"
    run(*args, "--out", str(tmp_path / "run"))
    run(*args, "--out", str(tmp_path / "clean"))
    def predictions(run_dir: Path):
        return pq.read_table(run_dir / "predictions.parquet").sort_by([("slide_id", "ascending"),
                                                                       ("seed", "ascending")])

    assert predictions(tmp_path / "run").equals(predictions(tmp_path / "clean"))


def test_export(base, tmp_path):
    out, clean = tmp_path / "out", tmp_path / "clean"
    args = ("export", "-s", str(base[0]), "-m", "uni", "--layout", "trident")
    killed("featurestore.pipelines.interop._export.os.replace", 3, *args[:1], str(out), *args[1:])
    assert len(list(out.glob("*.h5"))) == 2, "two whole files, no partial third"
    refused = CliRunner().invoke(app, [args[0], str(out), *args[1:]])
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    run(args[0], str(out), *args[1:], "--overwrite")
    run(args[0], str(clean), *args[1:])
    assert sorted(p.name for p in out.glob("*.h5")) == sorted(p.name for p in clean.glob("*.h5"))
    for path in clean.glob("*.h5"):
        with h5py.File(path) as a, h5py.File(out / path.name) as b:
            assert np.array_equal(a["features"][...], b["features"][...])
            assert np.array_equal(a["coords"][...], b["coords"][...])
