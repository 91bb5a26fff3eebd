"""Extraction efficiency: end-to-end ``fs extract`` tiles/s over model-only tiles/s, and where the rest goes.

    python -m benchmarks --only extract [--quick]
    python -m benchmarks.bench_extract [--quick]

All sides run in one process with the same teacher (the real EfficientNet-Lite0, channels-last), the
same torch thread count and the same sequence of batch sizes (a slide's last batch is partial on both).
Model only is ``Teacher.forward`` on uint8 tiles already in memory, so it includes the uint8 → float
normalise; backbone only is ``Teacher.embed_preprocessed`` on tiles already normalised. A fourth variant
is end to end with tiles read between batches (``workers`` batches at a time while the model waits)
instead of beside the model, the schedule to pick if a CPU model's threads lose more to readers
preempting them than reading beside them hides. All run in interleaved rounds
(``best_of_interleaved``), each keeping its fastest round; target ≥ 0.95 of model only.

Every end-to-end run is instrumented by wrapping the pipeline's own functions (nothing is
re-implemented): the main thread's stages — slide set-up (open, describe, tissue mask, grid), waiting
for pixels, normalise, model, commit, run set-up and the remainder — add up to the wall; the reader
threads' read + decode, resize and quality measures are given in thread-seconds beside them.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from benchmarks._common import best_of_interleaved, row
from featurestore.devices import resolve_device
from featurestore.encoders import Teacher
from featurestore.pipelines import extract
from featurestore.pipelines.demo import make_cohort
from featurestore.pipelines.extract import ExtractOptions, ExtractReport, load_teachers, run_extract
from featurestore.schemas import TilingSpec
from featurestore.store import Store

TEACHER = "efficientnet-lite0"
BATCH = 64

# Main-thread stages, in pipeline order; their sum and the remainder make up the wall.
SETUP = "slide set-up: open, describe, tissue mask, tile grid"
WAIT = "waiting for pixels (reads not done yet)"
NORMALISE = "uint8 → float normalise (Teacher.preprocess)"
MODEL = "model (Teacher.embed_preprocessed)"
COMMIT = "commit: annotation overlaps + Store.commit_slide"
RUN = "run set-up: discovery, store open, run records"
REST = "rest: torch.from_numpy, embeddings to numpy, loop"
# Reader-thread stages: thread-seconds that overlap the main thread.
READ = "read + decode (reader.read_regions)"
RESIZE = "resize to the tile size (rest of read_tiles)"
QUALITY = "tile quality measures (measure_tiles)"


class StageClock:
    """Seconds per stage, summed across calls and threads."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()
        self._local = threading.local()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds
        mine = self.on_this_thread()
        mine[stage] = mine.get(stage, 0.0) + seconds

    def on_this_thread(self) -> dict[str, float]:
        """Seconds per stage spent by the calling thread."""
        if not hasattr(self._local, "seconds"):
            self._local.seconds = {}
        return self._local.seconds

    def wrap(self, stage: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(stage, time.perf_counter() - t0)
        return timed


def read_between_batches(read: Callable[[np.ndarray], Any], batches: list[np.ndarray], workers: int,
                         depth: int) -> Iterator[tuple[np.ndarray, Any]]:
    """``_prefetch``'s contract, reading only while the consumer waits: ``workers`` batches at a time."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(batches), max(1, workers)):
            group = batches[start:start + max(1, workers)]
            yield from zip(group, list(pool.map(read, group)), strict=True)


@contextmanager
def instrumented(clock: StageClock, between_batches: bool = False) -> Iterator[None]:
    """Wrap the functions ``extract_slide`` calls so each one's time lands in ``clock``; ``between_batches``
    swaps the pipeline's prefetch for ``read_between_batches``."""

    def open_slide(*args: Any, **kwargs: Any) -> Any:
        reader = real_open_slide(*args, **kwargs)
        reader.read_regions = clock.wrap(READ, reader.read_regions)
        return reader

    def prefetch(*args: Any, **kwargs: Any) -> Iterator:
        stream = (read_between_batches if between_batches else real_prefetch)(*args, **kwargs)
        while True:
            t0 = time.perf_counter()
            item = next(stream, None)
            clock.add(WAIT, time.perf_counter() - t0)
            if item is None:
                return
            yield item

    def read_tiles(*args: Any, **kwargs: Any) -> Any:
        before = clock.on_this_thread().get(READ, 0.0)
        t0 = time.perf_counter()
        out = real_read_tiles(*args, **kwargs)
        clock.add(RESIZE, time.perf_counter() - t0 - (clock.on_this_thread().get(READ, 0.0) - before))
        return out

    real_open_slide, real_prefetch, real_read_tiles = extract.open_slide, extract._prefetch, extract.read_tiles
    with ExitStack() as stack:
        for name in ("describe_slide", "tissue_mask", "tile_grid"):
            stack.enter_context(mock.patch.object(extract, name, clock.wrap(SETUP, getattr(extract, name))))
        stack.enter_context(mock.patch.object(extract, "open_slide", clock.wrap(SETUP, open_slide)))
        stack.enter_context(mock.patch.object(extract, "_prefetch", prefetch))
        stack.enter_context(mock.patch.object(extract, "read_tiles", read_tiles))
        stack.enter_context(mock.patch.object(Teacher, "preprocess", clock.wrap(NORMALISE, Teacher.preprocess)))
        stack.enter_context(mock.patch.object(Teacher, "embed_preprocessed",
                                              clock.wrap(MODEL, Teacher.embed_preprocessed)))
        stack.enter_context(mock.patch.object(Store, "commit_slide", clock.wrap(COMMIT, Store.commit_slide)))
        for name, stage in (("measure_tiles", QUALITY), ("overlaps_of_new_tiles", COMMIT)):
            if hasattr(extract, name):
                stack.enter_context(mock.patch.object(extract, name, clock.wrap(stage, getattr(extract, name))))
        stack.enter_context(mock.patch.object(extract, "extract_slide", clock.wrap("slides", extract.extract_slide)))
        yield


def breakdown_rows(clock: StageClock, wall: float, case: str) -> list[dict]:
    """One row per stage: seconds, with the share of wall as the ratio."""
    s = clock.seconds
    main = {SETUP: s[SETUP], WAIT: s[WAIT], NORMALISE: s[NORMALISE], MODEL: s[MODEL], COMMIT: s[COMMIT],
            RUN: wall - s["slides"]}
    main[REST] = wall - sum(main.values())
    rows = [row("extraction stages", f"{case}: {stage}", seconds, "s", ratio=seconds / wall, vs="share of wall")
            for stage, seconds in main.items()]
    rows += [row("extraction stages", f"{case}: {stage}", s[stage], "thread-s", ratio=s[stage] / wall,
                 vs="share of wall", note="reader threads, beside the main thread")
             for stage in (READ, RESIZE, QUALITY) if stage in s]
    return rows


def run(quick: bool) -> list[dict]:
    device = str(resolve_device("auto"))
    opts = ExtractOptions(models=(TEACHER,), tiling=TilingSpec(0.5, 224), device=device, batch_size=BATCH,
                          qc=False)
    [teacher] = load_teachers(opts, device)
    rounds = 2 if quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        cohort = make_cohort(Path(tmp) / "cohort", 2 if quick else 5, size=4096, seed=3)
        stores = (Path(tmp) / f"store{i}" for i in range(10_000))
        warm = run_extract([cohort.root / "slides"], next(stores), opts)
        sizes = [n for o in warm.outcomes for n in [BATCH] * (o.tiles // BATCH) + [o.tiles % BATCH] if n]
        tiles = torch.randint(0, 256, (BATCH, 224, 224, 3), dtype=torch.uint8)
        normalised = teacher.preprocess(tiles)
        best: dict[str, tuple[float, StageClock]] = {}

        def end_to_end(name: str, between_batches: bool = False) -> Callable[[], None]:
            def extract_all() -> None:
                clock = StageClock()
                with instrumented(clock, between_batches):
                    report: ExtractReport = run_extract([cohort.root / "slides"], next(stores), opts)
                if report.failed or report.tiles != warm.tiles:
                    raise RuntimeError(f"extraction benchmark: {len(report.failed)} slides failed, {report.tiles} "
                                       f"tiles of {warm.tiles}: {report.failed[:1]}")
                if name not in best or report.wall_seconds < best[name][0]:
                    best[name] = report.wall_seconds, clock
            return extract_all

        def model_only() -> None:
            for n in sizes:
                teacher(tiles[:n])

        def backbone_only() -> None:
            for n in sizes:
                teacher.embed_preprocessed(normalised[:n])

        variants = {"model": model_only, "backbone": backbone_only, "e2e": end_to_end("e2e"),
                    "e2e between": end_to_end("e2e between", between_batches=True)}
        with torch.inference_mode():
            model_only()
            backbone_only()
            times = best_of_interleaved(variants, repeats=rounds)
    n = warm.tiles
    rate = {k: n / t for k, t in times.items()}
    case = (f"{TEACHER}, batch {BATCH}, {device}, {torch.get_num_threads()} torch threads, "
            f"{opts.read_workers} read workers, {len(warm.outcomes)} slides, {n} tiles, best of {rounds} interleaved")
    rows = [
        row("extraction", f"{case}: backbone only (normalised tiles in memory)", rate["backbone"], "tiles/s"),
        row("extraction", f"{case}: model only (uint8 tiles in memory, Teacher.forward)", rate["model"], "tiles/s",
            ratio=rate["model"] / rate["backbone"], vs="backbone only"),
        row("extraction", f"{case}: fs extract end to end", rate["e2e"], "tiles/s", ratio=rate["e2e"] / rate["model"],
            vs="model only", target="≥ 0.95"),
    ]
    rows.append(row("extraction", f"{case}: same, tiles read between batches", rate["e2e between"], "tiles/s",
                    ratio=rate["e2e between"] / rate["model"], vs="model only",
                    note=f"{rate['e2e between'] / rate['e2e']:.3f} × fs extract"))
    return rows + breakdown_rows(best["e2e"][1], best["e2e"][0], "best end-to-end round")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    from benchmarks.__main__ import print_rows

    print_rows(run(parser.parse_args().quick))
