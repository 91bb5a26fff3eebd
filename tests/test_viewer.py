"""fs view for real: the server started by the CLI on a free loopback port over a store extracted from generated
slides, its JSON and image endpoints checked against the store and ``fs search``, bad input refused with one
line while the server keeps serving, and the three pages rendered by headless Chromium."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from benchmarks.bench_viewer import fs_view
from featurestore.cli.main import app
from featurestore.index import build_index, search
from featurestore.pipelines.demo import make_cohort
from featurestore.pipelines.extract import ExtractOptions, PixelSpec, run_extract
from featurestore.schemas import TilingSpec
from featurestore.store import Store

TEACHER = "test/tiny-cnn"
MODEL = "emb_test_tiny_cnn"
REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@dataclass(frozen=True)
class Cohort:
    store: Path
    run: Path
    slides: dict[str, Path]
    """slide id → file; the last one has no cached pixels."""
    labels: dict[str, int]
    uncached: str
    annotated: str
    """A tumour slide with a "Tumor" annotation over its top-left quarter."""


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, one_torch_thread) -> Cohort:
    """Four generated slides: three extracted with cached pixels and one without, labels, an index, and a
    two-fold ABMIL run whose attention the slide page overlays."""
    root = tmp_path_factory.mktemp("viewer")
    demo = make_cohort(root / "cohort", 4, size=2048, seed=1)
    tiling = TilingSpec(target_mpp=0.5, tile_size=224)
    paths = [s.path for s in demo.slides]
    for chosen, pixels in ((paths[:3], (PixelSpec.parse("224@0.5"),)), (paths[3:], ())):
        report = run_extract(chosen, root / "store", ExtractOptions(models=(TEACHER,), tiling=tiling, device="cpu",
                                                                    batch_size=32, cache_pixels=pixels, qc=False))
        assert not report.failed, [o.error for o in report.failed]
    store = Store.open(root / "store")
    store.import_labels(demo.labels_csv)
    build_index(store, TEACHER)
    ids = {Path(r["path"]).name: r["slide_id"] for r in store.sql("SELECT slide_id, path FROM slides").to_pylist()}
    annotated = next(s for s in demo.slides if s.label == 1)
    geojson = root / "tumour.geojson"
    square = [[0, 0], [1024, 0], [1024, 1024], [0, 1024], [0, 0]]
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]},
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}]}))
    imported = runner.invoke(app, ["annotations", "import", str(geojson), "-s", str(root / "store"), "--slide",
                                   annotated.path.name])
    assert imported.exit_code == 0, imported.output
    trained = runner.invoke(app, ["train", "-s", str(root / "store"), "-m", TEACHER, "--label", "label", "--folds",
                                  "2", "--epochs", "2", "--hidden", "16", "--attention-dim", "8", "--bootstrap", "10",
                                  "--out", str(root / "runs" / "abmil")])
    assert trained.exit_code == 0, trained.output
    return Cohort(root / "store", root / "runs" / "abmil", {ids[p.name]: p for p in paths},
                  {ids[s.path.name]: s.label for s in demo.slides}, ids[paths[3].name], ids[annotated.path.name])


@pytest.fixture(scope="module")
def server(cohort, tmp_path_factory) -> Iterator[str]:
    """``fs view --port 0`` in its own process; the URL it prints."""
    with fs_view(cohort.store, "--runs", str(cohort.run), log=tmp_path_factory.mktemp("server") / "stderr.log") as url:
        yield url


def get(url: str, *, headers: dict | None = None) -> tuple[int, str, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers.get_content_type(), r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get_content_type(), err.read()


def get_json(url: str) -> dict:
    status, kind, body = get(url)
    assert status == 200 and kind == "application/json", (status, body[:300])
    return json.loads(body)


def error_of(url: str, status: int) -> str:
    got, _, body = get(url)
    assert got == status, (got, body[:300])
    text = json.loads(body)["error"] if body.startswith(b"{") else body.decode().strip()
    assert "\n" not in text and text
    return text


def post_image(url: str, content: bytes, fields: dict[str, str]) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="query.png"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def first_tile(store: Path, slide_id: str) -> int:
    return Store.open(store).sql("SELECT tile_id FROM tiles WHERE slide_id = ? ORDER BY tile_index LIMIT 1",
                                 [slide_id]).column(0)[0].as_py()


def test_cohort_slide_and_tiles_match_the_store(cohort, server):
    body = get_json(f"{server}/api/cohort")
    assert {r["slide_id"] for r in body["slides"]} == set(cohort.slides) and body["total"] == 4
    store = Store.open(cohort.store)
    counts = {r["slide_id"]: r["n"] for r in store.sql("SELECT slide_id, count(*) AS n FROM tiles GROUP BY ALL"
                                                         ).to_pylist()}
    for r in body["slides"]:
        assert r["tiles"] == counts[r["slide_id"]] and r["embedding_sets"] == [MODEL] and r["file_present"]
        assert r["labels"]["label"] == cohort.labels[r["slide_id"]]
    positive = get_json(f"{server}/api/cohort?where=" + urllib.request.quote("l.label = 1"))
    assert {r["slide_id"] for r in positive["slides"]} == {s for s, y in cohort.labels.items() if y == 1}

    sid = cohort.uncached
    info = get_json(f"{server}/api/slides/{sid}")
    assert (info["width"], info["height"]) == (2048, 2048) and info["runs"] == ["abmil"]
    assert [t["pixels"] for t in info["tilings"]] == [False] and info["sets"][0]["model"] == MODEL
    tiles = get_json(f"{server}/api/slides/{sid}/tiles")
    expected = store.sql("SELECT tile_id, x, y FROM tiles WHERE slide_id = ? ORDER BY tile_index", [sid]).to_pylist()
    # Tile ids are 63-bit: they travel as text, which a JavaScript number would round.
    assert [(int(t["tile_id"]), t["x"], t["y"]) for t in tiles["tiles"]] == [tuple(r.values()) for r in expected]
    assert tiles["footprint"] == 224 and {"tissue_fraction", "sharpness"} <= set(tiles["tiles"][0])


def test_search_answers_as_fs_search_does(cohort, server):
    sid = next(iter(cohort.slides))
    tile = first_tile(cohort.store, sid)
    store = Store.open(cohort.store, read_only=True)
    body = get_json(f"{server}/api/search?model={MODEL}&tile={tile}&k=5")
    assert body["level"] == "tiles"
    expected = search(store, MODEL, tile_id=tile, k=5).column("tile_id").to_pylist()
    assert [int(h["tile_id"]) for h in body["hits"]] == expected and expected[0] == tile
    assert all(h["pixels"] == "ok" and h["name"].endswith(".tiff") and "label" in h for h in body["hits"])
    where = urllib.request.quote("l.label = 1 AND t.tissue_fraction > 0.3")
    filtered = get_json(f"{server}/api/search?model={MODEL}&tile={tile}&k=8&where={where}")
    assert filtered["hits"] and {h["label"] for h in filtered["hits"]} == {1}
    slides = get_json(f"{server}/api/search?model={MODEL}&slide={sid}&k=4")
    assert slides["level"] == "slides" and slides["hits"][0]["slide_id"] == sid and len(slides["hits"]) == 4

    png = io.BytesIO()
    Image.fromarray(store.read_pixels(store.embedding_set(MODEL).tiling_id, sid, np.array([0]))[0]).save(png, "PNG")
    status, uploaded = post_image(f"{server}/api/search/image", png.getvalue(), {"model": MODEL, "k": "3"})
    assert status == 200 and int(uploaded["hits"][0]["tile_id"]) == tile, uploaded


def test_deep_zoom_thumbnails_and_overlays(cohort, server):
    sid = cohort.uncached
    status, kind, dzi = get(f"{server}/dz/{sid}.dzi")
    assert status == 200 and b'Width="2048"' in dzi and b'Height="2048"' in dzi
    status, kind, jpeg = get(f"{server}/dz/{sid}_files/11/0_0.jpeg")
    assert status == 200 and Image.open(io.BytesIO(jpeg)).size == (255, 255)
    store = Store.open(cohort.store, read_only=True)
    tiling = store.embedding_set(MODEL).tiling_id
    cached = next(s for s in cohort.slides if s != sid)
    for slide in (cached, sid):  # from the pixel cache, then from the slide file
        tile = first_tile(cohort.store, slide)
        status, kind, thumb = get(f"{server}/tiles/{tile}.jpeg")
        assert status == 200 and kind == "image/jpeg"
        shown = np.asarray(Image.open(io.BytesIO(thumb)).convert("RGB"), np.float32)
        assert shown.shape == (160, 160, 3) and shown.std() > 5
    truth = Image.fromarray(store.read_pixels(tiling, cached, np.array([0]))[0]).resize((160, 160))
    tile = first_tile(cohort.store, cached)
    shown = np.asarray(Image.open(io.BytesIO(get(f"{server}/tiles/{tile}.jpeg")[2])), np.float32)
    assert np.abs(shown - np.asarray(truth, np.float32)).mean() < 6
    info = get_json(f"{server}/api/slides/{cohort.annotated}")
    assert info["annotations"] == ["Tumor"] and get_json(f"{server}/api/slides/{sid}")["annotations"] == []
    status, _, png = get(f"{server}/overlay/{cohort.annotated}/annotation.png?class=Tumor")
    filled = np.asarray(Image.open(io.BytesIO(png)))[..., 3] == 150
    edge = 1024 + 224  # tiles crossing the square's edge overlap it too
    assert status == 200 and filled[:1024, :1024].any() and not filled[edge:, :].any() and not filled[:, edge:].any()
    assert "no annotation class" in error_of(f"{server}/overlay/{cohort.annotated}/annotation.png?class=Stroma", 404)
    for layer in ("tissue", "grid", "sharpness", "attention"):
        status, kind, png = get(f"{server}/overlay/{sid}/{layer}.png?run=abmil")
        assert status == 200 and kind == "image/png", (layer, png[:200])
        rgba = np.asarray(Image.open(io.BytesIO(png)))
        assert rgba.shape == (2048, 2048, 4) and 0 < (rgba[..., 3] > 0).mean() < 1, layer


def test_bad_input_is_one_line_and_the_server_keeps_serving(cohort, server):
    sid = next(iter(cohort.slides))
    version = Store.open(cohort.store).version
    assert "not in the store" in error_of(f"{server}/api/slides/{'0' * 32}", 404)
    assert "not in the store" in error_of(f"{server}/slide/nope", 404)
    assert "not in the store" in error_of(f"{server}/tiles/123.jpeg", 404)
    assert "not a tile id" in error_of(f"{server}/tiles/12ab.jpeg", 400)
    assert "not a tile id" in error_of(f"{server}/tiles/..passwd.jpeg", 400)
    for traversal in ("/tiles/..%2F..%2Fetc%2Fpasswd.jpeg", "/dz/..%2F..%2Fetc%2Fpasswd.dzi", "/static/..%2F_app.py"):
        assert get(f"{server}{traversal}")[0] == 404, traversal
    bad = urllib.request.quote("l.nope = 1")
    assert "predicate" in error_of(f"{server}/api/cohort?where={bad}", 400)
    assert "l.nope" in error_of(f"{server}/api/search?model={MODEL}&slide={sid}&where={bad}", 400)
    writes = urllib.request.quote("1=1; DELETE FROM slides")
    assert "predicate" in error_of(f"{server}/api/cohort?where={writes}", 400)
    assert "from 1 to 200" in error_of(f"{server}/api/search?model={MODEL}&slide={sid}&k=0", 400)
    assert "matches no embedding set" in error_of(f"{server}/api/search?model=nope&slide={sid}", 404)
    assert "not available" in error_of(f"{server}/overlay/{sid}/bogus.png", 404)
    status, body = post_image(f"{server}/api/search/image", b"%PDF-1.4 not a picture", {"model": MODEL})
    assert status == 400 and "not an image" in body["error"]
    region = io.BytesIO()
    Image.new("L", (4100, 4100)).save(region, "PNG")
    status, body = post_image(f"{server}/api/search/image", region.getvalue(), {"model": MODEL})
    assert status == 400 and "not a tile" in body["error"]
    # Another site's page reaching this port through a name of its own (DNS rebinding) is refused.
    assert get(f"{server}/api/cohort", headers={"Host": "evil.example"})[0] == 400
    req = urllib.request.Request(f"{server}/api/cohort", data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)
    assert refused.value.code == 405
    assert get_json(f"{server}/api/cohort")["total"] == 4
    assert Store.open(cohort.store).version == version, "nothing was written"


def test_a_slide_whose_file_is_gone_is_said_not_failed(cohort, server):
    sid = cohort.uncached
    path = cohort.slides[sid]
    moved = path.with_suffix(".moved")
    path.rename(moved)
    try:
        row = next(r for r in get_json(f"{server}/api/cohort")["slides"] if r["slide_id"] == sid)
        assert row["file_present"] is False
        assert get_json(f"{server}/api/slides/{sid}")["file_present"] is False
        assert "gone" in error_of(f"{server}/dz/{sid}.dzi", 410)
        assert "cannot read" in error_of(f"{server}/tiles/{first_tile(cohort.store, sid)}.jpeg", 410)
        hits = get_json(f"{server}/api/search?model={MODEL}&tile={first_tile(cohort.store, sid)}&k=40")["hits"]
        assert {h["pixels"] != "ok" for h in hits if h["slide_id"] == sid} == {True}
        assert {h["pixels"] for h in hits if h["slide_id"] != sid} == {"ok"}
    finally:
        moved.rename(path)


def test_view_refuses_a_port_in_use_and_a_public_address_without_the_flag(cohort):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        used = runner.invoke(app, ["view", "-s", str(cohort.store), "--port", str(port)])
    assert used.exit_code == 2 and "in use" in used.output and "--port" in used.output
    assert len(used.output.strip().splitlines()) == 1
    public = runner.invoke(app, ["view", "-s", str(cohort.store), "--host", "0.0.0.0"])
    assert public.exit_code == 2 and "--allow-remote" in public.output
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen(1)
        allowed = runner.invoke(app, ["view", "-s", str(cohort.store), "--host", "0.0.0.0", "--allow-remote",
                                      "--port", str(taken.getsockname()[1])])
    assert allowed.exit_code == 2 and "warning: listening on 0.0.0.0" in allowed.output and "in use" in allowed.output


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render(url: str, out: Path | None = None) -> str:
    """The page's DOM after its scripts ran (virtual time lets fetches and OpenSeadragon's tiles finish)."""
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,800",
            "--virtual-time-budget=10000", f"--user-data-dir={Path(os.environ.get('TMPDIR', '/tmp'))}/fs-view-"
            f"{uuid.uuid4().hex[:8]}"]
    if out is not None:
        subprocess.run([*args, f"--screenshot={out}", url], check=True, capture_output=True, timeout=90)
        with Image.open(out) as shot:  # a 256-colour palette keeps the README's pictures small
            shot.convert("RGB").quantize(256).save(out, optimize=True)
    return subprocess.run([*args, "--dump-dom", url], check=True, capture_output=True, text=True,
                          timeout=90).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_pages_render_in_a_browser(cohort, server):
    # FS_VIEWER_SCREENSHOTS=DIR also saves pictures of the three pages there (a second browser run each).
    shots = Path(os.environ["FS_VIEWER_SCREENSHOTS"]) if os.environ.get("FS_VIEWER_SCREENSHOTS") else None
    where = urllib.request.quote("l.label IS NOT NULL")
    cohort_dom = render(f"{server}/?where={where}", shots and shots / "viewer-cohort.png")
    assert 'data-ready="true"' in cohort_dom
    assert len(re.findall(r'class="slide-row"', cohort_dom)) == 4 and "4 of 4 slides" in cohort_dom

    sid = cohort.annotated
    tile = first_tile(cohort.store, sid)
    slide_url = f"{server}/slide/{sid}?layers=tissue,grid&run=abmil&annotation=Tumor&tile={tile}"
    slide_dom = render(slide_url, shots and shots / "viewer-slide.png")
    drawn = re.search(r'id="tiles-loaded" data-count="(\d+)"', slide_dom)
    assert drawn and int(drawn.group(1)) > 0, "OpenSeadragon drew no deep zoom tile"
    for layer in ("tissue", "grid", "attention", "annotation"):
        assert re.search(rf'data-layer="{layer}" data-state="loaded"', slide_dom), layer
    assert re.search(rf'id="selected-tile"[^>]*data-tile-id="{tile}"|data-tile-id="{tile}"[^>]*id="selected-tile"',
                     slide_dom)
    neighbours = slide_dom.split('id="neighbours"')[1]
    assert len(re.findall(r'class="hit" data-tile-id="\d+"', neighbours)) == 12

    where = urllib.request.quote("l.label = 1")
    search_url = f"{server}/search?model={MODEL}&tile={tile}&k=6&where={where}"
    search_dom = render(search_url, shots and shots / "viewer-search.png")
    results = search_dom.split('id="results"')[1]
    hits = re.findall(r'class="hit" data-tile-id="(\d+)"', results)
    assert len(hits) == 6 and hits[0] == str(tile)
    assert results.count("label=1") == 6 and "label=0" not in results

    slides_dom = render(f"{server}/search?model={MODEL}&slide={sid}&k=4")
    ranked = re.findall(r'class="hit" data-slide-id="([0-9a-f]+)"', slides_dom.split('id="results"')[1])
    assert len(ranked) == 4 and ranked[0] == sid and set(ranked) == set(cohort.slides)
    for name in ("viewer-cohort.png", "viewer-slide.png", "viewer-search.png") if shots else ():
        with Image.open(shots / name) as img:
            assert img.size == (1280, 800) and np.asarray(img.convert("L")).std() > 10, name


def test_the_reader_pyramid_matches_openslides_deep_zoom(tmp_path):
    """The Deep Zoom fallback for formats OpenSlide cannot read cuts the same tiles as OpenSlide's generator."""
    from featurestore.schemas import NotFoundError
    from featurestore.slides import open_slide
    from featurestore.viewer._deepzoom import OpenSlideDeepZoom, ReaderDeepZoom

    (slide,) = make_cohort(tmp_path, 1, size=1536, seed=3).slides
    ours, theirs = ReaderDeepZoom(open_slide(slide.path, reader="openslide")), OpenSlideDeepZoom(slide.path)
    try:
        size = r'(Width|Height)="(\d+)"'
        assert ours.level_count == theirs.level_count == 12
        assert sorted(re.findall(size, ours.dzi())) == sorted(re.findall(size, theirs.dzi())) == [
            ("Height", "1536"), ("Width", "1536")]
        top = ours.level_count - 1
        for level, col, row in ((top, 0, 0), (top, 5, 3), (top - 1, 1, 2), (top - 3, 0, 0), (3, 0, 0)):
            a = np.asarray(ours.tile(level, col, row), np.float32)
            b = np.asarray(theirs.tile(level, col, row), np.float32)
            assert a.shape == b.shape, (level, col, row)
            # Level 0 pixels are the file's own; coarser zooms differ only by resampling filter.
            assert np.abs(a - b).mean() < (0.5 if level == top else 4), (level, col, row)
        with pytest.raises(NotFoundError, match="outside level"):
            ours.tile(top, 99, 0)
    finally:
        ours.close()
        theirs.close()
