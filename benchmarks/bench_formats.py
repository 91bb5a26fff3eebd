"""Every slide format we read, made from the real Aperio SVS: pixel agreement with it, tile reading and
``fs extract`` throughput relative to it.

    python -m benchmarks --only formats [--quick]
    python -m benchmarks.bench_formats [--quick]

The real CMU-1-Small-Region.svs (20x, 0.499 µm/px), read through OpenSlide, is written into each format by
that format's own writer, the ones ``tests/slide_formats.py`` tests the readers with (imported from there, so
this runs from the checkout's root like every benchmark): wsidicom for DICOM WSI
(JPEG q95 as scanners write it, and uncompressed), pylibCZIrw for CZI, tifffile for OME-TIFF, Pillow for PNG
and JPEG. Every file holds the same region of the slide with the same µm/px, so one grid (0.5 µm/px, 224 px,
no tissue filter, edge tiles dropped) is the same level-0 boxes in each; ``tile_grid`` is run on every
reader and must return them. Then, for each backend ``auto`` tries for the file's format:

- pixels: every tile through ``read_tiles`` against the SVS read of the same box through OpenSlide (the
  pixels the files were written from): mean and max absolute difference, 0-255, over all samples;
- reading: the same tiles through ``open_slide`` + ``read_tiles`` (the open inside the timed call, as in
  ``bench_reading``), every variant interleaved with the SVS read through cuCIM (what ``auto`` picks for
  SVS) in the same rounds (``best_of_interleaved``); tiles/s and the ratio to that SVS read;
- extraction: ``run_extract`` (the real EfficientNet-Lite0 weights, the default Otsu tissue, batch 64) on
  each file with ``--reader auto``, interleaved with the SVS; tiles/s and the ratio to the SVS. The SVS is
  always extracted whole, so the ratio compares equal work only when the region is the whole slide (the
  quick and full sizes; the smoke test's crop checks the code path, not the figure).

Reading and extraction also give the same ratio in CPU seconds (every thread of the process, fewest over the
rounds): on cores shared with other jobs, the wall ratio moves with whoever else runs and the CPU ratio far
less; with spare cores, a backend that decodes on more threads wins wall time at equal CPU.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks._common import best_of_interleaved, row
from featurestore.devices import resolve_device
from featurestore.pipelines.discover import slide_bytes
from featurestore.pipelines.extract import ExtractOptions, load_teachers, run_extract
from featurestore.schemas import TilingSpec
from featurestore.slides import AUTO, SlideGeometry, TileGrid, detect_format, open_slide, read_tiles, tile_grid
from tests.conftest import REAL_SLIDE
from tests.slide_formats import REAL_MPP, TILE, pyramid_levels, write_czi, write_dicom, write_ome_tiff

TILING = TilingSpec(target_mpp=0.5, tile_size=224, tissue_method="none", min_tissue=0.0, edge="drop")
TEACHER = "efficientnet-lite0"
WORKERS = 2
"""Reader threads for the tile reads: the cores of the machine the figures were measured on."""
SVS = "Aperio SVS"


@dataclass(frozen=True)
class Plan:
    region: tuple[int, int, int, int] | None
    """x, y, width, height of the real slide's level 0 written into every format; None: the whole slide."""
    read_rounds: int
    extract_rounds: int


FULL = Plan(None, read_rounds=9, extract_rounds=3)
QUICK = Plan(None, read_rounds=5, extract_rounds=2)


@dataclass(frozen=True)
class FormatFile:
    """A file (or DICOM series folder) made from the real slide, and how it was written."""

    format: str
    written: str
    path: Path

    @property
    def name(self) -> str:
        return f"{self.format} ({self.written})"


def convert(source: np.ndarray, folder: Path) -> list[FormatFile]:
    """``source`` written into every format we read, each by its own writer, at the real slide's µm/px."""
    png, jpeg = folder / "slide.png", folder / "slide.jpg"
    Image.fromarray(source).save(png, compress_level=1)
    Image.fromarray(source).save(jpeg, quality=95)
    return [
        FormatFile("DICOM WSI", "wsidicom, JPEG q95 4:2:0, 2 levels",
                   write_dicom(folder / "dicom-jpeg", pyramid_levels(source, 2), REAL_MPP, jpeg=True, objective=20.0)),
        FormatFile("DICOM WSI", "wsidicom, uncompressed, 2 levels",
                   write_dicom(folder / "dicom-raw", pyramid_levels(source, 2), REAL_MPP, jpeg=False, objective=20.0)),
        FormatFile("CZI", "pylibCZIrw, zstd, 512 px subblocks", write_czi(folder / "slide.czi", source, REAL_MPP)),
        FormatFile("OME-TIFF", f"tifffile, zlib, {TILE} px tiles, 3 SubIFD levels",
                   write_ome_tiff(folder / "slide.ome.tif", pyramid_levels(source, 3), REAL_MPP)),
        FormatFile("PNG", "Pillow, compress level 1", png),
        FormatFile("JPEG", "Pillow, quality 95", jpeg),
    ]


def _planned(path: Path, backend: str) -> TileGrid:
    """The grid ``tile_grid`` plans on this reader (µm/px from the file, the real slide's where it has none)."""
    with open_slide(path, backend) as r:
        return tile_grid(r, TILING, None, mpp=r.mpp[0] if r.mpp else REAL_MPP)


def _same_tiles(a: TileGrid, b: TileGrid) -> bool:
    return (np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
            and (a.level, a.read_size, a.footprint) == (b.level, b.read_size, b.footprint))


class CpuClock:
    """Fewest CPU seconds (every thread of the process) of each named call: beside the wall-clock rounds, the
    work itself, which other jobs on shared cores slow down far less than they slow the wall."""

    def __init__(self) -> None:
        self.best: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable[[], object]) -> Callable[[], None]:
        def timed() -> None:
            t0 = time.process_time()
            fn()
            self.best[name] = min(self.best.get(name, float("inf")), time.process_time() - t0)
        return timed


def _read(path: Path, backend: str, grid: TileGrid) -> np.ndarray:
    with open_slide(path, backend) as r:
        return read_tiles(r, grid, np.arange(len(grid)), TILING.tile_size, num_workers=WORKERS)


def _extract(path: Path, stores: itertools.count, root: Path, opts: ExtractOptions, tiles: dict[str, int],
             name: str) -> None:
    report = run_extract([path], root / f"store{next(stores)}", opts)
    if report.failed or report.tiles == 0:
        raise RuntimeError(f"format benchmark: fs extract on {name}: {report.tiles} tiles, {report.failed[:1]}")
    tiles[name] = report.tiles


def run(quick: bool, plan: Plan | None = None) -> list[dict]:
    plan = plan or (QUICK if quick else FULL)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with open_slide(REAL_SLIDE, "openslide") as r:
            x0, y0, w, h = plan.region or (0, 0, *r.dimensions)
            source = r.read_region((x0, y0), 0, (w, h))
        files = [FormatFile(SVS, "the real file, Aperio JPEG", REAL_SLIDE), *convert(source, Path(tmp))]

        # Every file holds the region at the slide's µm/px, so the plan for the region is every reader's plan;
        # on the SVS the same boxes sit at the region's origin.
        region = tile_grid(SlideGeometry((w, h)), TILING, None, mpp=REAL_MPP)
        on_svs = region.with_coordinates(region.x + x0, region.y + y0)
        truth = _read(REAL_SLIDE, "openslide", on_svs)
        reads: dict[str, Callable[[], np.ndarray]] = {}
        for f in files:
            svs = f.path == REAL_SLIDE
            for backend in AUTO[detect_format(f.path)]:
                # The SVS's own plan covers the whole slide, so it is the region's only when the region is whole.
                if (not svs or plan.region is None) and not _same_tiles(_planned(f.path, backend), region):
                    raise RuntimeError(f"format benchmark: {backend} plans other tiles on {f.name} than on the SVS")
                reads[f"{f.name}: {backend}"] = partial(_read, f.path, backend, on_svs if svs else region)
        ref_read = f"{files[0].name}: cucim"
        for name, read in reads.items():
            diff = np.abs(read().astype(np.int16) - truth)
            rows.append(row("format pixels", f"{name}, {len(truth)} tiles vs the SVS through openslide",
                            float(diff.mean()), "MAE 0-255", note=f"max {int(diff.max())}"))
        cpu = CpuClock()
        seconds = best_of_interleaved({k: cpu.wrap(k, fn) for k, fn in reads.items()}, repeats=plan.read_rounds)
        for name, s in seconds.items():
            rows.append(row("format reading", f"{name}, {len(truth)} tiles, {WORKERS} workers", len(truth) / s,
                            "tiles/s", ratio=seconds[ref_read] / s, vs=ref_read,
                            note=f"CPU {cpu.best[ref_read] / cpu.best[name]:.3f} of the SVS's tiles/CPU-s"))

        device = str(resolve_device("auto"))
        opts = ExtractOptions(models=(TEACHER,), tiling=TilingSpec(0.5, 224), device=device, qc=False,
                              assume_mpp=REAL_MPP)
        load_teachers(opts, device)  # built once, outside the timed runs, as a long run amortises it
        tiles: dict[str, int] = {}
        stores = itertools.count()
        cpu = CpuClock()
        runs = {f.name: cpu.wrap(f.name, partial(_extract, f.path, stores, Path(tmp), opts, tiles, f.name))
                for f in files}
        seconds = best_of_interleaved(runs, repeats=plan.extract_rounds)
        rate = {name: tiles[name] / s for name, s in seconds.items()}
        cpu_rate = {name: tiles[name] / s for name, s in cpu.best.items()}
        ref_extract = files[0].name
        for f in files:
            rows.append(row("format extraction", f"{f.name}: fs extract, auto → {AUTO[detect_format(f.path)][0]}, "
                            f"{tiles[f.name]} tiles, {TEACHER} on {device}", rate[f.name], "tiles/s",
                            ratio=rate[f.name] / rate[ref_extract], vs=ref_extract,
                            note=f"CPU {cpu_rate[f.name] / cpu_rate[ref_extract]:.3f} of the SVS's tiles/CPU-s; "
                                 f"{slide_bytes(f.path) / 1e6:.1f} MB on disk"))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    from benchmarks.__main__ import print_rows

    print_rows(run(parser.parse_args().quick))
