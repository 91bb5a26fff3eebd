"""GPU figures for the real teacher architectures with random weights (no downloads).

    bash benchmarks/gpu.sh            # on a CUDA machine, after `make test` or `make demo`

For UNI (ViT-L/16), UNI2-h (ViT-H/14) and Prov-GigaPath (ViT-g/14), built from their official
configs with seeded random weights (same FLOPs as the real ones):

- model only: ``Teacher.forward`` (uint8 → bf16 autocast → embedding) on tiles already on the GPU;
- FLOP ceiling: the GPU's dense bf16 peak / FLOPs per tile (counted with ``FlopCounterMode``; a
  ViT-L/16 at 224 px is ~123 GFLOPs per tile as multiply-adds × 2); the ratio is model FLOP
  utilisation;
- end to end: ``fs extract`` on generated slides with the cuCIM reader, over model only;
- tile reading on the same tile list: cuCIM with GPU JPEG decode (``device="cuda"``), cuCIM on the CPU and
  OpenSlide, each ending with the tiles on the GPU.

``--peak-tflops`` overrides the bf16 peak looked up from the device name. ``--slides DIR`` runs on existing
slides instead of generating a cohort (on a machine without imagecodecs, which writing JPEG TIFFs needs).
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
    from featurestore.encoders import build_teacher, register_teacher, teacher_config

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
        if device == "cuda":  # stays on the GPU: CuImage exposes __cuda_array_interface__, which cupy wraps
            import cupy

            torch.as_tensor(cupy.asarray(batch), device="cuda")
        else:
            torch.from_numpy(np.asarray(batch)).to("cuda")
    torch.cuda.synchronize()
    return len(locs) / (time.perf_counter() - t0)


def _decode_openslide(path: Path, locs: list[tuple[int, int]]) -> float:
    """One OpenSlide handle per thread (its reads hold the GIL only briefly), eight threads like cuCIM."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import openslide

    local = threading.local()

    def read(loc: tuple[int, int]) -> np.ndarray:
        if not hasattr(local, "slide"):
            local.slide = openslide.OpenSlide(str(path))
        return np.asarray(local.slide.read_region(loc, 0, (224, 224)).convert("RGB"))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        for i in range(0, len(locs), 64):
            torch.as_tensor(np.stack(list(pool.map(read, locs[i:i + 64]))), device="cuda")
    torch.cuda.synchronize()
    return len(locs) / (time.perf_counter() - t0)


def run(quick: bool, peak_tflops: float | None = None, batch: int = 256, slides: Path | None = None,
        parts: tuple[str, ...] = ("models", "decode")) -> list[dict]:
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA device")
    peak = _peak(peak_tflops) * 1e12
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # The store's stack (DuckDB, zarr) is imported for the model rows only: the decode rows need
        # nothing but the readers, so they run on a machine that carries only those.
        if "models" in parts:
            from featurestore.pipelines.extract import ExtractOptions, run_extract
            from featurestore.schemas import TilingSpec
        if slides is None:
            from featurestore.pipelines.demo import make_cohort


            slides = make_cohort(Path(tmp) / "cohort", 2 if quick else 8, size=8192, seed=11).root / "slides"
        for name in (MODELS[:1] if quick else MODELS) if "models" in parts else ():
            teacher = _random_teacher(name)
            flops = _flops_per_tile(teacher)
            model_only = _model_only(teacher, batch)
            ceiling = peak / flops
            opts = ExtractOptions(models=(f"bench/{name}",), tiling=TilingSpec(0.5, 224), reader="cucim",
                                  device="cuda", batch_size=batch, read_workers=8, qc=False)
            # One slide first, into a throwaway store: the teacher's build (random init of up to 1.1 B
            # parameters on the CPU) and cuDNN's autotuning are start-up, paid once per run, not per tile.
            first = sorted(p for p in slides.iterdir() if p.is_file())[0]
            cold = run_extract([first], Path(tmp) / f"warm-{name}", opts)
            report = run_extract([slides], Path(tmp) / f"store-{name}", opts)
            end_to_end = report.tiles / report.wall_seconds
            rows.append(row("gpu", f"{name}: start-up (teacher build, first slide of {cold.tiles} tiles)",
                            cold.wall_seconds, "s"))
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
        decode_slides = sorted(p for p in slides.iterdir() if p.suffix in (".tif", ".tiff", ".svs"))
        for path in decode_slides if "decode" in parts else ():
            width, height = _level0_size(path)
            locs = [(x, y) for y in range(0, height - 224, 224) for x in range(0, width - 224, 224)]
            _decode(path, "cpu", locs[:64])  # first touch: file cache and decoder set-up
            _decode(path, "cuda", locs[:64])
            speeds = {"OpenSlide": _decode_openslide(path, locs), "cuCIM, CPU decode": _decode(path, "cpu", locs),
                      "cuCIM, GPU decode (nvJPEG)": _decode(path, "cuda", locs)}
            for case, value in speeds.items():
                rows.append(row("gpu", f"{path.name}: {len(locs)} JPEG tiles to the GPU, {case}", value, "tiles/s",
                                ratio=value / speeds["OpenSlide"], vs="OpenSlide"))
    return rows


def _level0_size(path: Path) -> tuple[int, int]:
    import openslide

    with openslide.OpenSlide(str(path)) as slide:
        return slide.dimensions


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--slides", type=Path, default=None, help="existing slides instead of a generated cohort")
    parser.add_argument("--only", choices=("models", "decode"), default=None)
    args = parser.parse_args()
    from benchmarks.__main__ import print_rows

    print({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None})
    print_rows(run(args.quick, args.peak_tflops, args.batch, args.slides,
                   (args.only,) if args.only else ("models", "decode")))
