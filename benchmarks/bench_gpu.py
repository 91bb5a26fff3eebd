"""GPU figures for the real teacher architectures with random weights (no downloads).

    bash benchmarks/gpu.sh            # on a CUDA machine, after `make test` or `make demo`

For UNI (ViT-L/16), UNI2-h (ViT-H/14) and Prov-GigaPath (ViT-g/14), built from their official
configs with seeded random weights (same FLOPs as the real ones):

- model only: ``Teacher.forward`` (uint8 → bf16 autocast → embedding) on tiles already on the GPU;
- FLOP ceiling: the GPU's dense bf16 peak / FLOPs per tile (counted with ``FlopCounterMode``; a
  ViT-L/16 at 224 px is ~123 GFLOPs per tile as multiply-adds × 2); the ratio is model FLOP
  utilisation;
- end to end: ``fs extract`` on generated slides with the cuCIM reader, over model only;
- cuCIM GPU JPEG decode (``device="cuda"``) against CPU decode on the same tile list.

``--peak-tflops`` overrides the bf16 peak looked up from the device name.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._common import best_of, row
from featurestore.encoders import build_teacher, register_teacher, teacher_config
from pipelines.demo import make_cohort, render_tissue, write_slide
from pipelines.extract import ExtractOptions, run_extract
from schemas import TilingSpec

MODELS = ("uni", "uni2-h", "gigapath")
PEAK_BF16_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def _peak(override: float | None) -> float:
    if override:
        return override
    name = torch.cuda.get_device_name(0)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops (dense bf16 peak of this device)")


def _random_teacher(name: str):
    """The real architecture and preprocessing with seeded weights, registered as ``bench/<name>``."""
    config = dataclasses.replace(teacher_config(name), name=f"bench/{name}", hub_id=None, weights_filename=None)
    register_teacher(config)
    return build_teacher(config.name, device="cuda")


def _flops_per_tile(teacher) -> float:
    x = torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8, device="cuda")
    with FlopCounterMode(display=False) as counter:
        teacher(x)
    return float(counter.get_total_flops())


def _model_only(teacher, batch: int, batches: int = 20) -> float:
    x = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device="cuda")
    teacher(x)
    torch.cuda.synchronize()

    def go() -> None:
        for _ in range(batches):
            teacher(x)
        torch.cuda.synchronize()

    return batch * batches / best_of(go, repeats=2)


def _decode(path: Path, device: str, locs: list[tuple[int, int]]) -> float:
    from featurestore.slides._cucim import import_cuimage

    img = import_cuimage()(str(path))
    t0 = time.perf_counter()
    for batch in img.read_region(locs, (224, 224), 0, num_workers=8, batch_size=64, device=device):
        torch.as_tensor(batch, device="cuda")
    torch.cuda.synchronize()
    return len(locs) / (time.perf_counter() - t0)


def run(quick: bool, peak_tflops: float | None = None, batch: int = 256) -> list[dict]:
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA device")
    peak = _peak(peak_tflops) * 1e12
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cohort = make_cohort(Path(tmp) / "cohort", 2 if quick else 8, size=8192, seed=11)
        for name in MODELS[:1] if quick else MODELS:
            teacher = _random_teacher(name)
            flops = _flops_per_tile(teacher)
            model_only = _model_only(teacher, batch)
            ceiling = peak / flops
            opts = ExtractOptions(models=(f"bench/{name}",), tiling=TilingSpec(0.5, 224), reader="cucim",
                                  device="cuda", batch_size=batch, read_workers=8, qc=False)
            report = run_extract([cohort.root / "slides"], Path(tmp) / f"store-{name}", opts)
            end_to_end = report.tiles / report.wall_seconds
            case = f"{name} ({flops / 1e9:.0f} GFLOPs/tile), bf16, batch {batch}"
            rows += [
                row("gpu", f"{case}: FLOP ceiling", ceiling, "tiles/s"),
                row("gpu", f"{case}: model only", model_only, "tiles/s", ratio=model_only / ceiling,
                    vs="FLOP ceiling", note="model FLOP utilisation"),
                row("gpu", f"{case}: fs extract end to end ({report.tiles} tiles)", end_to_end, "tiles/s",
                    ratio=end_to_end / model_only, vs="model only", target="≥ 0.9"),
            ]
            del teacher
            torch.cuda.empty_cache()
        path = Path(tmp) / "decode.tiff"
        write_slide(path, render_tissue(np.random.default_rng(0), 8192, 0.5), 0.5)
        locs = [(x, y) for y in range(0, 8192 - 224, 224) for x in range(0, 8192 - 224, 224)]
        cpu, gpu = _decode(path, "cpu", locs), _decode(path, "cuda", locs)
        rows.append(row("gpu", f"cuCIM decode, {len(locs)} JPEG tiles: CPU", cpu, "tiles/s"))
        rows.append(row("gpu", f"cuCIM decode, {len(locs)} JPEG tiles: GPU (nvJPEG)", gpu, "tiles/s",
                        ratio=gpu / cpu, vs="CPU decode"))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    from benchmarks.__main__ import print_rows

    print_rows(run(args.quick, args.peak_tflops, args.batch))
