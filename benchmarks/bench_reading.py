"""Tile reading: raw OpenSlide, raw cuCIM and our reader layer on the same tile list.

    python -m benchmarks.bench_reading [--quick]

Raw OpenSlide is ``OpenSlide.read_region`` per tile (on a thread pool of the same size) plus the
RGBA→RGB copy every user needs; raw cuCIM is one multi-location ``CuImage.read_region`` call with
``num_workers``, each batch copied into one array of all tiles. Every variant ends holding the
tiles (discarding each batch instead made raw cuCIM 5-8 % faster on a 1296-tile list: the page
faults of a 195 MB output, which ours and raw OpenSlide pay). Ours is ``read_tiles`` on the same
precomputed grid through ``open_slide`` (padding, batching, the uint8 copy out of cuCIM's reused
buffers). Every variant opens the slide inside the timed call.

Variants run in interleaved rounds (``best_of_interleaved``). Timed one after another (best of 3)
on shared cores, ours read 0.93-0.94 of raw cuCIM, a gap that profiling put in the timing, not in
the reader (its open and padding cost < 1 %). Target: ours within 5 % of the fastest raw backend
(ratio ≥ 0.95).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from benchmarks._common import best_of_interleaved, row
from featurestore.schemas import TilingSpec
from featurestore.slides import open_slide, read_tiles, tile_grid
from featurestore.slides.tiling import TileGrid

REAL_SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
REPEATS = 9
"""Rounds of every variant: a read of ~100 tiles takes ~0.1 s, so single runs sit within the cores' noise."""
TILING = TilingSpec(target_mpp=0.5, tile_size=224, tissue_method="none", min_tissue=0.0, edge="drop")


def _slides(quick: bool, tmp: Path) -> list[tuple[str, Path]]:
    from featurestore.pipelines.demo import render_tissue, write_slide

    size = 4096 if quick else 8192
    generated = tmp / "large.tiff"
    write_slide(generated, render_tissue(np.random.default_rng(0), size, 0.5), 0.5)
    slides = [(f"generated {size}px", generated)]
    if REAL_SLIDE.is_file():
        slides.insert(0, ("real SVS", REAL_SLIDE))
    return slides


def _raw_openslide(path: Path, locs: list[tuple[int, int]], size: int, workers: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import openslide

    with openslide.OpenSlide(path) as s, ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda loc: np.asarray(s.read_region(loc, 0, (size, size)))[..., :3].copy(), locs))


def _raw_cucim(path: Path, locs: list[tuple[int, int]], size: int, workers: int) -> None:
    from featurestore.slides._cucim import import_cuimage

    img = import_cuimage()(str(path))
    out, i = np.empty((len(locs), size, size, 3), np.uint8), 0
    for batch in img.read_region(locs, (size, size), 0, num_workers=workers, batch_size=min(32, len(locs))):
        arr = np.asarray(batch).reshape(-1, size, size, 3)
        out[i:i + len(arr)] = arr
        i += len(arr)


def _ours(path: Path, reader: str, grid: TileGrid, workers: int) -> None:
    with open_slide(path, reader) as r:
        read_tiles(r, grid, np.arange(len(grid)), TILING.tile_size, num_workers=workers)


def _variants(path: Path, grid: TileGrid, workers: int) -> dict[str, Callable[[], None]]:
    locs = list(zip(grid.x.tolist(), grid.y.tolist(), strict=True))
    return {
        "raw openslide": partial(_raw_openslide, path, locs, grid.read_size, workers),
        "raw cucim": partial(_raw_cucim, path, locs, grid.read_size, workers),
        "ours (openslide)": partial(_ours, path, "openslide", grid, workers),
        "ours (cucim)": partial(_ours, path, "cucim", grid, workers),
    }


def run(quick: bool) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in _slides(quick, Path(tmp)):
            with open_slide(path, "openslide") as r:
                grid = tile_grid(r, TILING, None, mpp=r.mpp[0] if r.mpp else 0.5)
            for workers in (1, 2):
                seconds = best_of_interleaved(_variants(path, grid, workers), repeats=REPEATS)
                rate = {v: len(grid) / s for v, s in seconds.items()}
                fastest = max(("raw openslide", "raw cucim"), key=rate.get)
                for variant, value in rate.items():
                    target = "≥ 0.95" if variant.startswith("ours") else ""
                    rows.append(row("tile reading", f"{name}, {len(grid)} tiles, {workers} worker(s): {variant}",
                                    value, "tiles/s", ratio=value / rate[fastest], vs=fastest, target=target))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    from benchmarks.__main__ import print_rows

    print_rows(run(parser.parse_args().quick))
