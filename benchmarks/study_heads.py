"""Which MIL head, on generated embedding-level cohorts: mean pooling against the attention heads at their
defaults, with the paired statistics of ``fs train --compare``.

The cohorts are bags of vectors, not slides: no pixel is rendered and no encoder runs. They are written
into a real store through its public write path (``Store.create``, ``commit_slide``, ``import_labels``),
and the heads are trained by the same code as ``fs train --compare``. That makes a grid of cohort sizes,
signals and seeds affordable on a CPU; what it cannot show is how a real encoder's features behave.

A cohort has two slides per patient and balanced patient labels. Every tile is drawn from one of
``TISSUES`` tissue prototypes (a slide's tissue mix varies from slide to slide, so a slide's mean
embedding moves for reasons unrelated to its label) plus isotropic noise. The signal is dialled:

- ``local``: a positive slide has ``foci`` tiles (a few, like small tumour foci) shifted by ``strength``
  noise standard deviations along a fixed direction; all other tiles look like a negative slide's.
- ``diffuse``: every tile of a positive slide is shifted by ``strength / 5`` noise sds, a weak change
  spread over the whole slide, which averaging over the bag brings out.

``flip`` of the patients have their label flipped after the slides are drawn (label noise).

    python -m benchmarks.study_heads --sizes 48,96,200 --gen-seeds 0,1,2 --signals local,diffuse [--preset before]
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from featurestore.distill.compare import compare
from featurestore.distill.mil import HeadConfig
from featurestore.distill.schedule import TRAIN, TRAIN_CV, CrossValidation, Schedule
from featurestore.distill.tasks import TaskSpec
from featurestore.distill.train import TrainConfig
from featurestore.schemas import EncoderSpec, Slide, TilingSpec
from featurestore.store import SlideCommit, Store, tiles_table

TISSUES = 6
"""Tissue prototypes a tile is drawn from."""


@dataclass(frozen=True)
class CohortSpec:
    """A generated cohort: ``slides`` slides (two per patient) of ``tiles`` tiles (low, high) in ``dim``
    dimensions; signal ``kind`` local or diffuse of ``strength`` noise sds over ``foci`` tiles; ``flip``
    of the patients mislabelled."""

    slides: int
    kind: str = "local"
    strength: float = 5.0
    foci: tuple[int, int] = (3, 8)
    flip: float = 0.1
    tiles: tuple[int, int] = (80, 160)
    dim: int = 64
    seed: int = 0

    def __str__(self) -> str:
        return (f"{self.slides} slides, {self.kind} signal {self.strength:g} sd"
                + (f" on {self.foci[0]}-{self.foci[1]} tiles" if self.kind == "local" else "")
                + f", {self.flip:.0%} flipped, seed {self.seed}")


MODEL = "synthetic"


def generate(root: Path, spec: CohortSpec) -> Path:
    """Write ``spec``'s cohort as a store under ``root``; return the store's path."""
    rng = np.random.default_rng(spec.seed)
    store = Store.create(root / "store")
    tiling = TilingSpec(0.5, 224)
    encoder = EncoderSpec(name=MODEL, version="1", weights_sha256="0" * 64, embed_dim=spec.dim, input_size=224,
                          mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pooling="cls")
    prototypes = rng.standard_normal((TISSUES, spec.dim)) * 1.5
    direction = rng.standard_normal(spec.dim)
    direction /= np.linalg.norm(direction)
    diffuse_shift = spec.strength / 5
    rows = []
    for p in range(spec.slides // 2):
        label = p % 2
        observed = label ^ int(rng.random() < spec.flip)
        for k in range(2):
            i = 2 * p + k
            slide = Slide(slide_id=f"{i:032x}", path=f"/synthetic/slide_{i}.svs", bytes=1, vendor="synthetic",
                          width=100_000, height=100_000, mpp_x=0.5, mpp_y=0.5, objective_power=20.0, level_count=1)
            n = int(rng.integers(*spec.tiles))
            mix = rng.dirichlet(np.full(TISSUES, 0.5))
            emb = prototypes[rng.choice(TISSUES, n, p=mix)] + rng.standard_normal((n, spec.dim))
            if label and spec.kind == "local":
                hit = rng.choice(n, int(rng.integers(spec.foci[0], spec.foci[1] + 1)), replace=False)
                emb[hit] += spec.strength * direction
            elif label:
                emb += diffuse_shift * direction
            cells = rng.permutation(20 * 20)[:n]
            tiles = tiles_table(slide.slide_id, tiling.id, (cells % 20) * 448, (cells // 20) * 448, 0, 448,
                                np.ones(n))
            store.commit_slide(SlideCommit(slide, tiling, tiles, {encoder: emb.astype(np.float32)}))
            rows.append(f"slide_{i}.svs,P{p:04d},{observed}")
    csv = root / "labels.csv"
    csv.write_text("filename,patient,label\n" + "\n".join(rows) + "\n")
    store.import_labels(csv)
    return root / "store"


PRESETS: dict[str, tuple[Schedule, CrossValidation]] = {
    "defaults": (TRAIN, TRAIN_CV),
    "before": (replace(TRAIN, lr=2e-4), replace(TRAIN_CV, window=1)),
}
"""``defaults``: ``fs train``'s schedule today; ``before``: the schedule this study replaced (lr 2e-4). The
other change, attention that starts as mean pooling, is in the head, not the schedule: the before
tables of docs/mil-heads.md ran ``--preset before`` at commit 34e69dc, before that change."""


def study(spec: CohortSpec, heads: list[str], out: Path, *, preset: str = "defaults", folds: int = 4,
          seeds: int = 3, bootstrap: int = 1000) -> dict:
    """``fs train --compare`` at a preset's schedule and the default head sizes on a generated cohort."""
    store = generate(out / "cohort", spec)
    schedule, cv = PRESETS[preset]
    cfg = TrainConfig(store=store, model=MODEL, task=TaskSpec("classification", "label"), out=out / "compare",
                      schedule=replace(schedule, device="cpu"), cv=replace(cv, folds=folds, seeds=seeds),
                      bootstrap=bootstrap, heatmaps=0, cache_gb=0.5)
    return compare(cfg, [HeadConfig(h) for h in heads])


def _row(spec: CohortSpec, result: dict, baseline: str) -> list[str]:
    cells = [str(spec.slides), spec.kind, f"{spec.strength:g}", str(spec.seed)]
    for h in result["heads"].values():
        cells.append(f"{h['pooled']:.3f} ({h['ci95'][0]:.2f}–{h['ci95'][1]:.2f})")
    for r in result["pairs"]:
        if baseline not in (r["a"], r["b"]):
            continue
        sign = 1 if r["b"] == baseline else -1
        lo, hi = (sign * v for v in r["ci95"])
        cells.append(f"{sign * r['difference']:+.3f} ({min(lo, hi):+.2f}–{max(lo, hi):+.2f}) "
                     f"DeLong p {r['delong_p']:.2g}, Wilcoxon p {r['wilcoxon_p']:.2g}")
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="48,96,200", help="slides per cohort, comma-separated")
    parser.add_argument("--gen-seeds", default="0,1,2", help="generator seeds")
    parser.add_argument("--signals", default="local,diffuse")
    parser.add_argument("--strength", type=float, default=5.0, help="signal strength, noise sds")
    parser.add_argument("--flip", type=float, default=0.1, help="share of patients with a flipped label")
    parser.add_argument("--heads", default="mean,abmil")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--preset", choices=list(PRESETS), default="defaults")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small heads train faster on one intra-op thread, and the grid shares the cores
    heads = args.heads.split(",")
    baseline = heads[0]
    others = [h for h in heads if h != baseline]
    print("| slides | signal | strength | gen seed | " + " | ".join(f"{h} AUROC (95 % CI)" for h in heads) + " | "
          + " | ".join(f"{h} − {baseline} (paired CI), tests" for h in others) + " |")
    print("|" + "---|" * (4 + len(heads) + len(others)))
    for size in (int(s) for s in args.sizes.split(",")):
        for kind in args.signals.split(","):
            for seed in (int(s) for s in args.gen_seeds.split(",")):
                spec = CohortSpec(size, kind, args.strength, flip=args.flip, seed=seed)
                with tempfile.TemporaryDirectory() as tmp:
                    result = study(spec, heads, Path(tmp), preset=args.preset, folds=args.folds,
                                   seeds=args.seeds, bootstrap=args.bootstrap)
                print("| " + " | ".join(_row(spec, result, baseline)) + " |", flush=True)


if __name__ == "__main__":
    main()
