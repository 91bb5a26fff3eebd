"""README.md's "Python API" example runs, statement by statement, against a store built here."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

import featurestore as fs
from featurestore.index import build_index
from featurestore.schemas import TilingSpec
from featurestore.store import Store
from tests.conftest import commit_random_slide, make_encoder, make_slide

README = Path(__file__).resolve().parents[1] / "README.md"
MODEL = "efficientnet-lite0"


def python_api_example() -> str:
    """The one ```python block of the README's "## Python API" section."""
    text = README.read_text()
    section = re.search(r"^## Python API\n(.*?)(?=^## )", text, re.M | re.S)
    assert section, "README.md has no '## Python API' section"
    blocks = re.findall(r"^```python\n(.*?)^```", section.group(1), re.M | re.S)
    assert len(blocks) == 1, f"the Python API section should hold one python example, found {len(blocks)}"
    return blocks[0]


@pytest.fixture
def demo_store(tmp_path, monkeypatch):
    """``demo/store`` as the example names it: four labelled slides of one model, its index built."""
    store = Store.create(tmp_path / "demo" / "store")
    enc = make_encoder(MODEL, 16)
    for i in range(4):
        commit_random_slide(store, i, TilingSpec(target_mpp=0.5, tile_size=224), [enc], 20 + 5 * i, dtype="float32")
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label,grade\n" + "".join(f"{make_slide(i).slide_id},{i % 2},{i}\n" for i in range(4)))
    store.import_labels(labels)
    build_index(store, MODEL)
    monkeypatch.chdir(tmp_path)
    return store


def test_the_python_api_example_runs(demo_store, capsys):
    code = python_api_example()
    namespace: dict = {"__name__": "__readme__"}
    skipped = []
    for statement in ast.parse(code).body:
        source = ast.get_source_segment(code, statement)
        try:
            exec(compile(ast.Module([statement], []), "README.md", "exec"), namespace)  # noqa: S102 - the test's point
        except fs.MissingDependencyError as err:
            # pandas is optional: without it the DataFrame line must fail with the one-line install hint.
            assert importlib.util.find_spec("pandas") is None and "pip install pandas" in str(err), source
            skipped.append(source)
    assert len(skipped) <= 1
    printed = capsys.readouterr().out
    assert "4 slides, 110 tiles" in printed and "emb_efficientnet_lite0" in printed, printed

    # What the comments promise.
    bag, batch, tiles, emb, rows, again = (namespace[k] for k in ("bag", "batch", "tiles", "emb", "rows", "again"))
    assert bag.target is not None and batch.x.shape[0] == 4 and batch.y.shape == (4,)
    assert namespace["labels"].column("slide_id").to_pylist() == sorted(make_slide(i).slide_id for i in (1, 2, 3))
    assert namespace["X"].shape == (tiles.num_rows, 16) and tiles.num_rows == bag.features.shape[0]
    np.testing.assert_array_equal(namespace["X"], bag.features.numpy())
    assert rows["tile_index"].to_pylist() == list(range(len(emb)))
    np.testing.assert_array_equal(again, emb[::-1])
    assert namespace["hits"].num_rows >= 1 and set(namespace["hits"]["label"].to_pylist()) == {1}
    assert len(namespace["one"][0].features) == len(emb) and len(namespace["pinned"]) == 4
