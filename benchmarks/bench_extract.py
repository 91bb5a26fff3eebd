"""Extraction efficiency: end-to-end ``fs extract`` tiles/s over model-only forward tiles/s.

    python -m benchmarks.bench_extract [--quick]

Both sides use the same teacher (the real EfficientNet-Lite0), batch size and device; the model-only
side runs ``Teacher.forward`` (preprocessing included) on uint8 tiles already in memory. The ratio
says how much of the reading, decoding, tissue detection and writing is hidden behind compute.
Target ≥ 0.9.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks._common import best_of, row
from featurestore.devices import resolve_device
from featurestore.pipelines.demo import make_cohort
from featurestore.pipelines.extract import ExtractOptions, load_teachers, run_extract
from featurestore.schemas import TilingSpec

TEACHER = "efficientnet-lite0"
BATCH = 64


def run(quick: bool) -> list[dict]:
    device = str(resolve_device("auto"))
    opts = ExtractOptions(models=(TEACHER,), tiling=TilingSpec(0.5, 224), device=device, batch_size=BATCH,
                          qc=False)
    [teacher] = load_teachers(opts, device)
    with tempfile.TemporaryDirectory() as tmp:
        cohort = make_cohort(Path(tmp) / "cohort", 2 if quick else 4, size=4096, seed=3)
        runs = [run_extract([cohort.root / "slides"], Path(tmp) / f"store{i}", opts) for i in range(2)]
    tiles_done = runs[0].tiles
    end_to_end = max(r.tiles / r.wall_seconds for r in runs)
    tiles = torch.randint(0, 256, (BATCH, 224, 224, 3), dtype=torch.uint8)
    n_batches = max(2, tiles_done // BATCH)

    def forward_all() -> None:
        for _ in range(n_batches):
            teacher(tiles.to(device)).cpu()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():
        teacher(tiles.to(device))
        model_only = n_batches * BATCH / best_of(forward_all, repeats=2)
    case = f"{TEACHER}, batch {BATCH}, {device}, {tiles_done} tiles, best of 2"
    return [
        row("extraction", f"{case}: model only (preloaded uint8)", model_only, "tiles/s"),
        row("extraction", f"{case}: fs extract end to end", end_to_end, "tiles/s", ratio=end_to_end / model_only,
            vs="model only", target="≥ 0.9"),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    from benchmarks.__main__ import print_rows

    print_rows(run(parser.parse_args().quick))
