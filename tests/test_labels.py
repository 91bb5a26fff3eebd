"""Labels import: any columns, matched by file name or slide id; bad files change nothing."""

from __future__ import annotations

import pytest

from featurestore.store import Store
from schemas import LabelsError
from tests.conftest import commit_random_slide, make_encoder, make_slide


@pytest.fixture
def store(tmp_path, tiling):
    store = Store.create(tmp_path / "s")
    for i in range(3):
        commit_random_slide(store, i, tiling, [make_encoder()], 4)
    return store


def write(tmp_path, text):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def test_import_by_filename_keeps_free_columns(store, tmp_path):
    csv = write(tmp_path, "filename,patient,label,grade,survival_months,event,note\n"
                          "slide_0.svs,p1,1,3,12.5,1,big\nslide_1.svs,p1,0,0,40,0,\nslide_2.svs,p2,1,5,3.2,1,x\n")
    assert store.import_labels(csv) == 3
    rows = store.sql("SELECT s.path, l.* EXCLUDE (commit_id) FROM labels l JOIN slides s USING (slide_id) "
                     "ORDER BY s.path").to_pylist()
    assert rows[0]["grade"] == 3 and rows[0]["survival_months"] == 12.5 and rows[1]["note"] is None
    assert rows[2]["patient"] == "p2" and rows[2]["filename"] == "slide_2.svs"


def test_import_by_slide_id_and_reimport_replaces(store, tmp_path):
    sid = make_slide(1).slide_id
    store.import_labels(write(tmp_path, f"slide_id,label\n{sid},0\n"), key="slide_id")
    store.import_labels(write(tmp_path, f"slide_id,label\n{sid},1\n"), key="slide_id")
    assert store.sql("SELECT label FROM labels").to_pylist() == [{"label": 1}]


@pytest.mark.parametrize(("text", "key", "match"), [
    ("name,label\nslide_0.svs,1\n", "filename", r"labels.csv: no 'filename' column .*--key slide_id"),
    ("filename,label\nslide_0.svs,1\nslide_1.svs,0\nslide_0.svs,1\n", "filename",
     r"labels.csv line 4: duplicate filename 'slide_0.svs' \(also on line 2\)"),
    ("filename,label\nslide_0.svs,1\nnope.svs,1\n", "filename",
     r"labels.csv line 3: no slide with filename 'nope.svs'"),
    ("filename,label\n,1\n", "filename", r"line 2: empty filename"),
    ("slide_id,label\nabc,1\n", "slide_id", r"line 2: no slide with slide_id 'abc'"),
    ("filename,commit_id\nslide_0.svs,1\n", "filename", "reserved"),
])
def test_bad_labels_are_refused_with_file_and_line_and_nothing_is_written(store, tmp_path, text, key, match):
    commits = sorted((store.root / "commits").iterdir())
    with pytest.raises(LabelsError, match=match):
        store.import_labels(write(tmp_path, text), key=key)
    assert sorted((store.root / "commits").iterdir()) == commits
    assert store.sql("SELECT count(*) AS n FROM labels").column("n")[0].as_py() == 0
    assert not any((store.root / "staging").iterdir())
