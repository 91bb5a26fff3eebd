"""``fs view``: a search request and a slide page's first view, against the ``fs search`` call underneath.

    python -m benchmarks --only viewer [--quick]

A cohort is built as tests/test_viewer.py's fixture builds it (demo slides, ``fs extract``, labels, a flat
FAISS index), ``fs view --port 0`` is started in its own process (as the tests start it), and in interleaved
rounds (``best_of_interleaved``) three things are timed from this process over HTTP:

- the reference: ``featurestore.index.search(store, model, tile_id=..., k=12, where="l.label = 1")``, the
  call ``fs search --tile ... -k 12 --where "l.label = 1"`` makes, on a store opened once;
- ``GET /api/search`` with the same query tile, k and predicate (one request, the JSON read to the end);
- a slide page's first view, fetched in the order the page's script asks for it (``first_view``): the
  page, its stylesheet and scripts, ``/api/slides/<id>``, then the DZI beside the tile table and
  ``/api/sets``, OpenSeadragon's button images, and the deep zoom tiles of the first levels it draws. Requests
  a browser would send together go out together (up to six at a time, a browser's limit per host).

Each round opens a slide not viewed before (the server caches a slide's deep zoom once opened), so every
round's page view is a true first view; so there are at most as many rounds as slides.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tempfile
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks._common import best_of_interleaved, row
from featurestore.index import build_index, search
from featurestore.pipelines.demo import make_cohort
from featurestore.pipelines.extract import ExtractOptions, PixelSpec, run_extract
from featurestore.schemas import TilingSpec
from featurestore.store import Store

K = 12
WHERE = "l.label = 1"
BROWSER_CONNECTIONS = 6
DZ_TILE = 254
"""``featurestore.viewer._deepzoom``'s tile edge (OpenSlide's DeepZoomGenerator default)."""
FIRST_VIEW_EDGES = (128, 1024)
"""The first view draws the deep zoom levels from the first one at least 128 px on its long side to the first
one at least 1024 px: headless Chromium at 1280 x 800 (as tests/test_viewer.py renders the page) asked a
2048-px demo slide for levels 7-10 (128 to 1024 px; 1 + 4 + 9 + 25 tiles) and nothing else. The page's viewer
is 560 px high (viewer.css), so these sizes follow the screen, not the slide."""
OSD_BUTTONS = [f"{b}_{s}.png" for b in ("zoomin", "zoomout", "home", "fullpage")
               for s in ("rest", "grouphover", "hover", "pressed")]
"""OpenSeadragon's four default buttons, each in four states, loaded when the viewer is created."""


@dataclass(frozen=True)
class Plan:
    n_slides: int
    size: int
    teacher: str
    rounds: int


FULL = Plan(8, 4096, "efficientnet-lite0", 5)
QUICK = Plan(4, 2048, "efficientnet-lite0", 4)


def build_cohort(root: Path, plan: Plan) -> tuple[Path, str]:
    """tests/test_viewer.py's cohort without its training run and annotation (the first view asks for
    neither): demo slides extracted with cached pixels, labels, a flat index. Returns (store, model)."""
    demo = make_cohort(root / "cohort", plan.n_slides, size=plan.size, seed=1)
    opts = ExtractOptions(models=(plan.teacher,), tiling=TilingSpec(target_mpp=0.5, tile_size=224), device="cpu",
                          batch_size=32, cache_pixels=(PixelSpec.parse("224@0.5"),), qc=False)
    report = run_extract([s.path for s in demo.slides], root / "store", opts)
    if report.failed:
        raise RuntimeError(f"extraction failed: {[o.error for o in report.failed]}")
    store = Store.open(root / "store")
    store.import_labels(demo.labels_csv)
    build_index(store, plan.teacher, kind="flat")
    return root / "store", next(iter(store.view_names()))


@contextmanager
def fs_view(store: Path, *args: str, log: Path) -> Iterator[str]:
    """``fs view --port 0 [args]`` in its own process; yields the URL it prints. Its stderr goes to ``log``:
    a pipe nobody reads could fill and stall the server."""
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-c", "from featurestore.cli.main import app; app()", "view", "-s",
                                 str(store), "--port", "0", *args], stdout=subprocess.PIPE, stderr=err, text=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(60)
    try:
        found = re.search(r"http://127\.0\.0\.1:\d+", line[0] if line else "")
        if not found:
            raise RuntimeError(f"fs view did not start: {line} {log.read_text()[-2000:]}")
        yield found.group(0)
    finally:
        proc.terminate()
        proc.wait(10)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}")
        return r.read()


def first_levels(width: int, height: int) -> list[tuple[int, list[str]]]:
    """(level, tile names "col_row") of the deep zoom levels a first view draws (``FIRST_VIEW_EDGES``)."""
    top = math.ceil(math.log2(max(width, height)))
    out = []
    for level in range(top + 1):
        scale = 2 ** (top - level)
        w, h = math.ceil(width / scale), math.ceil(height / scale)
        if max(w, h) >= FIRST_VIEW_EDGES[0]:
            out.append((level, [f"{c}_{r}" for c in range(math.ceil(w / DZ_TILE))
                                for r in range(math.ceil(h / DZ_TILE))]))
        if max(w, h) >= FIRST_VIEW_EDGES[1]:
            break
    return out


def first_view(base: str, slide_id: str, pool: ThreadPoolExecutor) -> tuple[int, int]:
    """Every request of the slide page's first view, in the page script's order; returns (requests, of
    which deep zoom tiles)."""
    def together(urls: list[str]) -> list[bytes]:
        return list(pool.map(fetch, urls))

    fetch(f"{base}/slide/{slide_id}")
    together([f"{base}/static/viewer.css", f"{base}/static/openseadragon/openseadragon.min.js",
              f"{base}/static/viewer.js"])
    info = json.loads(fetch(f"{base}/api/slides/{slide_id}"))
    tiling = urllib.parse.quote(info["tilings"][0]["tiling_id"])
    # OpenSeadragon opens the DZI (and loads its buttons) while the page loads the tile table, then /api/sets.
    dzi, _ = together([f"{base}/dz/{slide_id}.dzi", f"{base}/api/slides/{slide_id}/tiles?tiling={tiling}"])
    width, height = (int(re.search(rf'{a}="(\d+)"', dzi.decode()).group(1)) for a in ("Width", "Height"))
    tiles = [f"{base}/dz/{slide_id}_files/{level}/{name}.jpeg" for level, names in first_levels(width, height)
             for name in names]
    rest = [f"{base}/api/sets", *(f"{base}/static/openseadragon/images/{b}" for b in OSD_BUTTONS), *tiles]
    together(rest)
    return 7 + len(rest), len(tiles)


def measure(plan: Plan) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench-viewer-") as tmp:
        store_path, model = build_cohort(Path(tmp), plan)
        store = Store.open(store_path, read_only=True)
        slides = [r["slide_id"] for r in store.sql("SELECT slide_id FROM slides ORDER BY slide_id").to_pylist()]
        tile = store.sql("SELECT t.tile_id FROM tiles t JOIN labels l USING (slide_id) WHERE l.label = 1 "
                         "ORDER BY t.slide_id, t.tile_index LIMIT 1").column(0)[0].as_py()
        n_tiles = store.sql("SELECT count(*) FROM tiles").column(0)[0].as_py()
        expected = search(store, model, tile_id=tile, k=K, where=WHERE).column("tile_id").to_pylist()
        query = urllib.parse.urlencode({"model": model, "tile": tile, "k": K, "where": WHERE})
        log = store_path.parent / "fs-view.log"
        with fs_view(store_path, log=log) as base, ThreadPoolExecutor(BROWSER_CONNECTIONS) as pool:
            got = json.loads(fetch(f"{base}/api/search?{query}"))["hits"]  # also the server's warm-up
            if [int(h["tile_id"]) for h in got] != expected:
                raise RuntimeError("the search endpoint and fs search disagree")
            unseen = iter(slides)
            requests: list[tuple[int, int]] = []
            rounds = min(plan.rounds, len(slides))
            best = best_of_interleaved({
                "fs search": lambda: search(store, model, tile_id=tile, k=K, where=WHERE),
                "endpoint": lambda: fetch(f"{base}/api/search?{query}"),
                "first view": lambda: requests.append(first_view(base, next(unseen), pool)),
            }, repeats=rounds)
    ref = best["fs search"]
    n_requests, n_dz = requests[0]
    size = f"{plan.n_slides} slides of {plan.size}², {n_tiles} tiles, {plan.teacher}"
    return [
        row("viewer", f"fs search call (reference): tile, k={K}, where {WHERE}; {size}", ref * 1e3, "ms"),
        row("viewer", "GET /api/search, same query", best["endpoint"] * 1e3, "ms", ratio=best["endpoint"] / ref,
            vs="fs search call", target="< 1 s", note=f"best of {rounds}"),
        row("viewer", f"slide page first view ({n_requests} requests: page, assets, JSON, DZI, "
                      f"{n_dz} deep zoom tiles)", best["first view"] * 1e3, "ms",
            ratio=best["first view"] / ref, vs="fs search call", target="< 1 s",
            note=f"best of {rounds}, each a slide not opened before"),
    ]


def run(quick: bool, plan: Plan | None = None) -> list[dict]:
    """The benchmark runner's entry (``python -m benchmarks --only viewer``)."""
    return measure(plan or (QUICK if quick else FULL))


if __name__ == "__main__":
    from benchmarks.__main__ import print_rows

    print_rows(run("--quick" in sys.argv))
