"""Labels import: any columns, matched by file name or slide id; bad files change nothing."""

from __future__ import annotations

import csv
import io

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from featurestore.schemas import LabelsError
from featurestore.store import Store
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
    assert store.import_labels(csv).rows == 3
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
    ("name,label\nslide_0.svs,1\n", "filename", r"labels.csv: no 'filename' column .*--key-column COL"),
    ("name,label\nslide_0.svs,1\n", None, r"labels.csv: no slide column \(columns: name, label\)"),
    ("filename,grade\nslide_0.svs,1\nslide_1.svs,2021-03-04\nslide_2.svs,2\n", None,
     r"labels.csv line 3, column 'grade': '2021-03-04' is not int64"),
    ("filename,label,label\nslide_0.svs,1,2\n", None, r"line 1: duplicate column 'label'"),
    ("filename,label\nslide_0.svs,1,3\n", None, r"line 2: 3 cells for 2 columns"),
    ("filename,label\nslide_0.svs,1\nslide_1.svs,0\nslide_0.svs,1\n", "filename",
     r"labels.csv line 4: duplicate filename 'slide_0.svs' \(also on line 2\)"),
    ("filename,label\nslide_0.svs,1\nnope.svs,1\n", "filename",
     r"labels.csv line 3: no slide with filename 'nope.svs' in the store \(1 such rows\).*--skip-unknown"),
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


def test_a_cell_that_is_not_utf8_is_refused_by_line_and_column(store, tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(b"filename,site,label\nslide_0.svs,Z\xfcrich,1\n")
    with pytest.raises(LabelsError, match=r"labels.csv line 2, column 'site': byte 0xfc is not UTF-8"):
        store.import_labels(path)
    assert store.sql("SELECT count(*) AS n FROM labels").column("n")[0].as_py() == 0


def test_an_import_updates_its_columns_and_keeps_the_others(store, tmp_path):
    store.import_labels(write(tmp_path, "filename,label,grade\nslide_0.svs,1,3\nslide_1.svs,0,1\n"))
    store.import_labels(write(tmp_path, "slide,grade,site\nslide_0,4,A\n"))
    rows = {r["filename"]: r for r in store.sql("SELECT * EXCLUDE (commit_id) FROM labels").to_pylist()}
    assert (rows["slide_0.svs"]["label"], rows["slide_0.svs"]["grade"], rows["slide_0.svs"]["site"]) == (1, 4, "A")
    assert (rows["slide_1.svs"]["label"], rows["slide_1.svs"]["grade"], rows["slide_1.svs"]["site"]) == (0, 1, None)
    with pytest.raises(LabelsError, match=r"line 2, column 'grade': 'high' is not int64"):
        store.import_labels(write(tmp_path, "filename,grade\nslide_1.svs,high\n"))


def test_rows_for_slides_not_in_the_store_can_be_skipped(store, tmp_path):
    report = store.import_labels(write(tmp_path, "wsi,label\nslide_2.svs,1\nlater.svs,0\n"), skip_unknown=True)
    assert (report.rows, report.skipped) == (1, 1)
    assert store.sql("SELECT label FROM labels").to_pylist() == [{"label": 1}]


CELL = st.one_of(st.text(max_size=6), st.integers(-5, 5).map(str), st.floats(allow_nan=False).map(repr),
                 st.sampled_from(["", "true", "2021-03-04", "1,5", '"', "\n", "x\r"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.sampled_from(["slide_0.svs", "slide_1.svs", "slide_2.svs", "nope.svs"]),
                               CELL, CELL), min_size=1, max_size=5),
       raw=st.binary(max_size=8))
@example(rows=[("slide_0.svs", "", "")], raw=b"\r\x80")  # a stray CR before a non-UTF-8 byte
def test_any_labels_file_leaves_a_readable_view_with_exactly_the_accepted_rows(store, tmp_path, rows, raw):
    before = store.sql("SELECT * FROM labels ORDER BY slide_id")
    buffer = io.StringIO()
    csv.writer(buffer).writerows([("filename", "a", "b"), *rows])
    path = tmp_path / "fuzz.csv"
    path.write_bytes(buffer.getvalue().encode() + raw)
    try:
        report = store.import_labels(path, skip_unknown=True)
    except LabelsError as err:
        assert str(path) in str(err) and "\n" not in str(err), "one line naming the file"
        assert store.sql("SELECT * FROM labels ORDER BY slide_id") == before, "a refused file changes nothing"
        return
    known = {name for name, _, _ in rows if name != "nope.svs"}
    after = store.sql("SELECT * EXCLUDE (commit_id) FROM labels").to_pylist()
    assert report.rows == len(known) and report.skipped == len(rows) - len(known)
    assert {r.get("filename") for r in after} == {r.get("filename") for r in before.to_pylist()} | known
