"""QuPath annotations in and out on a generated slide: fs extract --geojson, fs annotations import, fs search.

The slide is 2048 px at 0.5 µm/px and tiles are 224 px at 0.5 µm/px, so the grid is exactly
224-px squares from (0, 0) and every overlap below is a ratio of areas worked out by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from typer.testing import CliRunner

from featurestore.cli.main import app
from featurestore.pipelines.annotations import QC_MEASUREMENTS, resolve_slide
from featurestore.pipelines.demo import make_cohort
from featurestore.schemas import TilingSpec
from featurestore.slides import open_slide, tissue_mask
from featurestore.slides.geojson import (
    TISSUE,
    UNCLASSIFIED,
    AnnotationError,
    annotation_classes,
    mask_polygons,
    read_qupath,
    tile_overlaps,
)
from featurestore.store import Store

runner = CliRunner()
TEACHER = "test/tiny-cnn"
F = 224  # a tile's level-0 edge: 224 px at 0.5 µm/px on a 0.5 µm/px slide


def cell(col: int, row: int) -> tuple[int, int]:
    return col * F, row * F


def square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(geometry: dict, classification: object = None, object_type: str = "annotation") -> dict:
    properties: dict = {"objectType": object_type}
    if classification is not None:
        properties["classification"] = classification
    return {"type": "Feature", "geometry": geometry, "properties": properties}


# Tumor: tile columns 2..5 of rows 2..5 and the left half of column 6, with tile (3, 3) cut out as a hole.
TUMOR = {"type": "Polygon", "coordinates": [square(2 * F, 2 * F, 6 * F + F / 2, 6 * F),
                                            square(3 * F, 3 * F, 4 * F, 4 * F)]}
# Stroma: a quarter of tile (0, 0) and the top half of tile (2, 2), as one MultiPolygon.
STROMA = {"type": "MultiPolygon", "coordinates": [[square(0, 0, F / 2, F / 2)],
                                                  [square(2 * F, 2 * F, 3 * F, 2 * F + F / 2)]]}


def expected_overlaps() -> dict[tuple[str, int, int], float]:
    """(class, column, row) → the fraction of that tile inside the class, by hand."""
    out = {("Tumor", c, r): 1.0 for c in range(2, 6) for r in range(2, 6) if (c, r) != (3, 3)}
    out |= {("Tumor", 6, r): 0.5 for r in range(2, 6)}
    out |= {("Stroma", 0, 0): 0.25, ("Stroma", 2, 2): 0.5}
    return out


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> tuple[Path, Path, str]:
    """One generated slide extracted with --geojson, every tile kept (--min-tissue 0)."""
    root = tmp_path_factory.mktemp("annotations")
    cohort = make_cohort(root / "cohort", 1, size=2048, seed=3)
    store = root / "store"
    result = run("extract", cohort.slides[0].path, "-s", store, "-m", TEACHER, "--device", "cpu",
                 "--min-tissue", 0, "--batch-size", 32, "--read-workers", 1, "--geojson")
    assert result.exit_code == 0, result.output
    sid = Store.open(store, read_only=True).slides()[0].slide_id
    return cohort.slides[0].path, store, sid


def test_qc_geojson_holds_the_stored_tile_grid_and_the_tissue_mask(extracted):
    slide_path, store_path, sid = extracted
    store = Store.open(store_path, read_only=True)
    tiles = store.sql("SELECT tile_index, x, y, tissue_fraction FROM tiles WHERE slide_id = ? ORDER BY tile_index",
                      [sid])
    assert tiles.num_rows == 100  # 2048 / 224 → 10 × 10 tiles with edge padding
    assert set(tiles.column("x").to_pylist()) == {i * F for i in range(10)}

    objects, skipped = read_qupath(store_path / "qc" / f"{sid}.geojson")
    assert skipped == 0
    grid = [o for o in objects if o.object_type == "tile"]
    assert [int(o.measurements["tile_index"]) for o in grid] == tiles.column("tile_index").to_pylist()
    bounds = shapely.bounds([o.geometry for o in grid])
    x, y = tiles.column("x").to_numpy(), tiles.column("y").to_numpy()
    np.testing.assert_array_equal(bounds, np.stack([x, y, x + F, y + F], axis=1))
    stored = store.sql("SELECT * FROM tiles WHERE slide_id = ? ORDER BY tile_index", [sid])
    measured = [c for c in QC_MEASUREMENTS if c in stored.column_names and stored.column(c).null_count == 0]
    assert {"tile_index", "tissue_fraction"} <= set(measured)
    for name in measured:
        np.testing.assert_allclose([o.measurements[name] for o in grid], stored.column(name).to_numpy(), rtol=1e-6)

    tissue = [o for o in objects if o.object_type == "annotation"]
    assert tissue and {o.class_name for o in tissue} == {TISSUE}
    with open_slide(slide_path) as reader:
        mask = tissue_mask(reader, TilingSpec(target_mpp=0.5, tile_size=224), mpp=0.5)
    union = shapely.union_all([o.geometry for o in tissue])
    pixel_area = (2048 / mask.mask.shape[1]) * (2048 / mask.mask.shape[0])
    assert union.area == pytest.approx(mask.mask.sum() * pixel_area)
    # The contours are the mask the tiling measured: each tile's share of them is its stored tissue fraction.
    hit, fraction = tile_overlaps(union, x, y, F)
    share = np.zeros(len(x))
    share[hit] = fraction
    np.testing.assert_allclose(share, tiles.column("tissue_fraction").to_numpy(), atol=1e-6)


def test_import_overlaps_match_hand_computed_fractions_and_search_filters_by_class(extracted, tmp_path):
    _, store_path, sid = extracted
    qc = json.loads((store_path / "qc" / f"{sid}.geojson").read_text())
    # QuPath's export: the tissue and tiles it was given back, plus what the pathologist drew.
    drawn = qc["features"] + [feature(TUMOR, {"name": "Tumor", "color": [200, 0, 0]}),
                              feature(STROMA, {"name": "Stroma", "colorRGB": -16711936})]
    export = tmp_path / "demo_000.geojson"
    export.write_text(json.dumps({"type": "FeatureCollection", "features": drawn}))

    result = run("annotations", "import", export, "-s", store_path)
    assert result.exit_code == 0, result.output
    store = Store.open(store_path, read_only=True)
    rows = store.sql("SELECT a.class_name, t.x, t.y, a.overlap FROM tile_annotations a JOIN tiles t "
                     "USING (tile_id) WHERE a.class_name <> 'Tissue'").to_pylist()
    got = {(r["class_name"], r["x"] // F, r["y"] // F): r["overlap"] for r in rows}
    want = expected_overlaps()
    assert got.keys() == want.keys()  # tile (3, 3) lies in Tumor's hole: no row at all
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key

    areas = {r["class_name"]: r["area"] for r in store.sql("SELECT class_name, area FROM annotations").to_pylist()}
    assert areas["Tumor"] == pytest.approx(4.5 * F * 4 * F - F * F)
    assert areas["Stroma"] == pytest.approx(F * F / 4 + F * F / 2)
    tumor = shapely.from_geojson(store.sql("SELECT geometry FROM annotations WHERE class_name = 'Tumor'")
                                 .column("geometry")[0].as_py())
    assert len(tumor.interiors) == 1

    assert run("index", "build", "-m", TEACHER, "-s", store_path).exit_code == 0
    query = store.sql("SELECT tile_id FROM tiles ORDER BY tile_index LIMIT 1").column("tile_id")[0].as_py()
    tumour_tiles = set(store.sql("SELECT tile_id FROM tile_annotations WHERE class_name = 'Tumor' "
                                 "AND overlap >= 0.5").column("tile_id").to_pylist())
    assert len(tumour_tiles) == 19
    friendly = run("search", "-s", store_path, "-m", TEACHER, "--tile", query, "-k", 50, "--in-class", "Tumor:0.5",
                   "-f", "json")
    assert friendly.exit_code == 0, friendly.output
    hits = {h["tile_id"] for h in json.loads(friendly.output)}
    assert hits == tumour_tiles
    where = ("t.tile_id IN (SELECT tile_id FROM tile_annotations WHERE class_name = 'Tumor' AND overlap >= 0.5) "
             "AND t.x < 1000")
    plain = run("search", "-s", store_path, "-m", TEACHER, "--tile", query, "-k", 50, "--where", where, "-f", "json")
    assert plain.exit_code == 0, plain.output
    hits = json.loads(plain.output)
    assert hits and {h["tile_id"] for h in hits} <= tumour_tiles and all(h["x"] < 1000 for h in hits)
    both = run("search", "-s", store_path, "-m", TEACHER, "--tile", query, "-k", 50, "--in-class", "Tumor",
               "--in-class", "Stroma", "-f", "json")
    assert {h["tile_id"] for h in json.loads(both.output)} == set(store.sql(
        "SELECT tile_id FROM tiles WHERE x = 448 AND y = 448").column("tile_id").to_pylist())
    unknown = run("search", "-s", store_path, "-m", TEACHER, "--tile", query, "--in-class", "Necrosis")
    assert unknown.exit_code == 2 and "Stroma, Tissue, Tumor" in unknown.output.replace("\n", " ")

    # A tiling cut after the import gets its overlaps in its own commit: a 448-px tile holds 2 × 2 of the cells.
    slide_path = Path(store.slides()[0].path)
    assert run("extract", slide_path, "-s", store_path, "-m", TEACHER, "--device", "cpu", "--tile-size", 448,
               "--min-tissue", 0, "--read-workers", 1).exit_code == 0
    coarse = store.sql("SELECT a.class_name, t.x, t.y, a.overlap FROM tile_annotations a JOIN tiles t USING (tile_id) "
                       "WHERE a.class_name <> 'Tissue' AND t.read_size = 448").to_pylist()
    got = {(r["class_name"], r["x"] // (2 * F), r["y"] // (2 * F)): r["overlap"] for r in coarse}
    want = {}
    for (name, c, r), value in expected_overlaps().items():
        want[name, c // 2, r // 2] = want.get((name, c // 2, r // 2), 0.0) + value / 4
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key

    # A new export of the slide replaces every class and overlap of the last one.
    export.write_text(json.dumps([feature({"type": "Polygon", "coordinates": [square(0, 0, F, F)]})]))
    assert run("annotations", "import", export, "-s", store_path).exit_code == 0
    assert store.sql("SELECT class_name, overlap FROM tile_annotations ORDER BY overlap").to_pylist() == [
        {"class_name": UNCLASSIFIED, "overlap": 0.25}, {"class_name": UNCLASSIFIED, "overlap": 1.0}]  # both tilings
    assert store.sql("SELECT class_name FROM annotations").column("class_name").to_pylist() == [UNCLASSIFIED]


def test_bad_files_are_one_line_each_and_the_rest_of_the_batch_completes(extracted, tmp_path):
    slide_path, store_path, sid = extracted
    folder = tmp_path / "exports"
    folder.mkdir()
    tumor = feature(TUMOR, "Tumor")  # QuPath 0.1's classification: a bare string
    (folder / "demo_000.geojson").write_text(json.dumps(tumor))
    (folder / "unknown_slide.geojson").write_text(json.dumps(tumor))
    (folder / "demo_000.tiff.geojson").write_text(json.dumps(feature(
        {"type": "Polygon", "coordinates": [square(0, 0, 4096, 4096)]}, "Tumor")))
    (folder / "broken.geojson").write_text('{"type": "FeatureCollection",\n "features": [\n  {"type": }\n]}')
    (folder / "points.geojson").write_text(json.dumps(
        {"type": "FeatureCollection", "features": [feature({"type": "Point", "coordinates": [5, 5]})]}))
    before = Store.open(store_path, read_only=True).version

    result = run("annotations", "import", folder, "-s", store_path)
    assert result.exit_code == 1
    failed = [line for line in result.output.splitlines() if "failed:" in line]
    assert len(failed) == 4, result.output
    text = result.output.replace("\n", " ")
    assert "unknown_slide.geojson: no slide in the store is named 'unknown_slide'" in text
    assert "demo_000.tiff.geojson: annotations span x 0..4096" in text and "2048 × 2048" in text
    assert "broken.geojson line 3: not JSON" in text
    assert "points.geojson: only 1 point or line objects" in text
    store = Store.open(store_path, read_only=True)
    assert store.version == before + 1  # the one good file: one commit
    assert store.sql("SELECT DISTINCT class_name FROM annotations").column("class_name").to_pylist() == ["Tumor"]

    # A single file is refused in one line, exit 2, and the store is left as it was.
    single = run("annotations", "import", folder / "broken.geojson", "-s", store_path, "--slide", sid[:8])
    assert single.exit_code == 2 and single.output.count("\n") == 1 and "Traceback" not in single.output
    assert Store.open(store_path, read_only=True).version == before + 1
    several = run("annotations", "import", folder, "-s", store_path, "--slide", sid)
    assert several.exit_code == 2 and "takes one annotation file, got 5" in several.output
    bound = run("search", "-s", store_path, "-m", TEACHER, "--tile", 1, "--in-class", "Tumor:1.5")
    assert bound.exit_code == 2 and "in (0, 1], e.g. Tumor:0.5" in bound.output.replace("\n", " ")
    assert Store.open(store_path, read_only=True).version == before + 1
    # --slide takes the slide's file name (or path, id, id prefix) whatever the export is called.
    named = run("annotations", "import", folder / "unknown_slide.geojson", "-s", store_path, "--slide",
                slide_path.name)
    assert named.exit_code == 0, named.output


@pytest.mark.parametrize("doc, classes", [
    ([feature(TUMOR, {"name": "Tumor"})], ["Tumor"]),
    (feature(TUMOR), [UNCLASSIFIED]),
    ({"type": "FeatureCollection", "features": [
        feature(TUMOR, {"names": ["Tumor", "Positive"]}),
        feature({"type": "LineString", "coordinates": [[0, 0], [9, 9]]}, "Stroma"),
        {"type": "Feature", "geometry": None, "properties": {"classification": {"name": "Stroma"}}},
        feature(STROMA, "Stroma", object_type="detection")]}, ["Tumor: Positive"]),
])
def test_qupath_export_shapes(tmp_path, doc, classes):
    path = tmp_path / "x.geojson"
    path.write_text(json.dumps(doc))
    objects, _ = read_qupath(path)
    assert [c.name for c in annotation_classes(objects, path, 2048, 2048)] == classes


def test_a_self_crossing_brush_stroke_is_repaired_not_refused(tmp_path):
    path = tmp_path / "bowtie.geojson"
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [F, F], [F, 0], [0, F], [0, 0]]]}
    path.write_text(json.dumps(feature(bowtie, "Tumor")))
    objects, _ = read_qupath(path)
    (tumor,) = annotation_classes(objects, path, 2048, 2048)
    assert tumor.geometry.is_valid and tumor.area == pytest.approx(F * F / 2)


def test_mask_polygons_keep_holes(tmp_path):
    from featurestore.slides import TissueMask

    mask = np.zeros((8, 8), bool)
    mask[1:7, 1:7] = True
    mask[3:5, 3:5] = False
    (ring,) = mask_polygons(TissueMask(mask, mpp=8.0, downsample=16.0), 128, 128)
    assert len(ring.interiors) == 1 and ring.area == pytest.approx(32 * 16 * 16)


def test_slide_names_resolve_like_other_commands(extracted):
    _, store_path, sid = extracted
    slides = Store.open(store_path, read_only=True).slides()
    for name in (sid, sid[:10], "demo_000", "demo_000.tiff", slides[0].path):
        assert resolve_slide(slides, name, "--slide").slide_id == sid
    with pytest.raises(AnnotationError, match="no slide in the store is named 'demo_001'"):
        resolve_slide(slides, "demo_001", "--slide")


def test_overlaps_of_a_hundred_thousand_tiles_add_up_to_the_class_area():
    side = 316  # 99,856 tiles
    xs, ys = np.meshgrid(np.arange(side) * F, np.arange(side) * F)
    t = np.linspace(0, 2 * np.pi, 2000, endpoint=False)
    wavy = 30000 + 3000 * np.sin(13 * t)
    centre = side * F / 2
    tumour = shapely.Polygon(np.c_[centre + wavy * np.cos(t), centre + wavy * np.sin(t)],
                             holes=[np.c_[centre + 5000 * np.cos(t), centre + 5000 * np.sin(t)]])
    hit, fraction = tile_overlaps(tumour, xs.ravel(), ys.ravel(), F)
    assert fraction.sum() * F * F == pytest.approx(tumour.area, rel=1e-9)
    assert np.all((fraction > 0) & (fraction <= 1)) and np.all(np.diff(hit) > 0)
    hole_centre = np.flatnonzero((xs.ravel() == side // 2 * F) & (ys.ravel() == side // 2 * F))
    assert not np.isin(hole_centre, hit).any()
