"""Stage-two saving: a distillation epoch from the cache vs the teacher run online vs the in-memory floor.

    python -m benchmarks.bench_distill [--quick]

One generated cohort is extracted with the real EfficientNet-Lite0 (pixels cached at 224@0.5), then
the same student (mobilenetv3_small_100, feature KD, AdamW, same batches and augmentation) runs the
same plan of steps three ways, every step through ``distill.kd.loop``'s own training pass:

- **cache**: batches from ``CachedTiles`` (cached pixels and cached targets), as ``fs distill`` runs
  an epoch once its slides are in the LRU cache; a *cold* epoch (a fresh ``CachedTiles``: store
  reads and the resize to the student's input included) is reported too;
- **online**: the same batches, but each step's targets come from the real teacher run in
  inference mode on the 224-px tiles in the student's dihedral view (pixels preloaded in memory, so
  online pays no slide reading: the comparison favours it);
- **floor**: the batches materialised in memory beforehand, then only the student steps.

Every variant calls ``distill.kd.loop.run_pass``, the loop ``fs distill`` trains with, on its own
batch source: re-implementing the step here would measure a different loop.

Ratios: speedup = online / cache, against the compute ratio (teacher forward + student train step)
/ student train step, both counted with ``torch.utils.flop_counter`` (target speedup ≥ 0.8 × it);
and cache / floor (target ≤ 1.15).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from benchmarks._common import best_of_interleaved, row
from featurestore.distill.kd import DistillConfig
from featurestore.distill.kd import evaluate as E
from featurestore.distill.kd.data import Batch, CachedTiles, SlideBalancedSampler, dihedral_each
from featurestore.distill.kd.loop import TargetScaling, run_pass
from featurestore.distill.kd.objectives import ObjectiveConfig, Targets, build_objective
from featurestore.distill.kd.students import Student, create_student
from featurestore.distill.schedule import KD
from featurestore.encoders import Teacher, build_teacher
from featurestore.pipelines.demo import make_cohort
from featurestore.pipelines.extract import ExtractOptions, PixelSpec, run_extract
from featurestore.schemas import TilingSpec
from featurestore.store import Store

TEACHER = "efficientnet-lite0"
STUDENT = "mobilenetv3_small_100"
TILING = TilingSpec(target_mpp=0.5, tile_size=224)
INPUT_SIZE = 112
BATCH = 64


@dataclass
class Setup:
    """Everything the three loops share: the data, the student and its objective, and the fixed plan."""

    store: Store
    data: CachedTiles
    slide_ids: list[str]
    cfg: DistillConfig
    student: Student
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaling: TargetScaling
    plan: list[np.ndarray]

    def fresh_data(self) -> CachedTiles:
        return CachedTiles(self.store, self.data.sets, self.data.pixel_tiling, self.slide_ids, {},
                           input_size=INPUT_SIZE)

    def batches(self) -> list[Batch]:
        """The plan's batches from the cache, as the training pass draws them (same augmentation seed)."""
        return list(self.data.iterate(self.plan, augment=self.cfg.augment, seed=1))

    def epoch(self, data: CachedTiles | _Online | _InMemory) -> None:
        """One training pass over ``plan`` through ``distill.kd.loop.run_pass``."""
        run_pass(self.student, self.objective, data, self.plan, cfg=self.cfg, device=torch.device("cpu"),
                 teacher_head=None, primary=TEACHER, scaling=self.scaling, optimizer=self.optimizer,
                 scheduler=torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0),
                 scaler=torch.amp.GradScaler("cuda", enabled=False), seed=1)


@dataclass
class _InMemory:
    """The floor: batches already assembled in memory, replayed."""

    batches: list[Batch]

    def iterate(self, plan: list[np.ndarray], *, augment: object, seed: int) -> Iterator[Batch]:
        return iter(self.batches)


@dataclass
class _Online:
    """The cache's batches with targets replaced by the teacher's forward pass on the same tiles."""

    data: CachedTiles
    teacher: Teacher
    pixels: list[np.ndarray]

    def iterate(self, plan: list[np.ndarray], *, augment: object, seed: int) -> Iterator[Batch]:
        for batch in self.data.iterate(plan, augment=augment, seed=seed):
            tiles = np.stack([self.pixels[s][t] for s, t in zip(batch.slide.tolist(), batch.tile.tolist(),
                                                                 strict=True)])
            target = self.teacher(dihedral_each(torch.from_numpy(tiles), batch.views)).clone()
            yield dataclasses.replace(batch, teachers={TEACHER: target})


def _setup(store: Store, steps: int) -> Setup:
    es = store.embedding_set(TEACHER)
    slide_ids = sorted(store.sql(f"SELECT slide_id FROM bags WHERE set_id = '{es.id}'").column(0).to_pylist())
    data = CachedTiles(store, [es], TILING, slide_ids, {}, input_size=INPUT_SIZE)
    cfg = DistillConfig(store=store.root, teachers=(TEACHER,), student=STUDENT, objective="feature", out="unused",
                        input_size=INPUT_SIZE, schedule=replace(KD, batch_size=BATCH, device="cpu"))
    torch.manual_seed(0)
    backbone, spec = create_student(STUDENT, INPUT_SIZE)
    student = Student(backbone, spec).to(memory_format=torch.channels_last)
    objective = build_objective("feature", ObjectiveConfig(), student_dim=student.dim, channels=student.channels,
                                teacher_dims={TEACHER: es.embed_dim}, n_classes=0, k=1)
    optimizer = torch.optim.AdamW([*student.parameters(), *objective.parameters()], lr=cfg.schedule.lr,
                                  weight_decay=cfg.schedule.weight_decay)
    per_slide = -(-steps * BATCH // len(slide_ids))
    sampler = SlideBalancedSampler(data.n_tiles, per_slide, BATCH, sizes=[data.slide_bytes(i)
                                                                         for i in range(len(slide_ids))],
                                   budget=4 << 30, seed=0)
    scaling = TargetScaling({TEACHER: data.target_stats(TEACHER)}, torch.device("cpu"))
    return Setup(store, data, slide_ids, cfg, student, objective, optimizer, scaling, sampler.epoch(0)[:steps])


def _conv_backward_flops(grad_out_shape: list[int], x_shape: list[int], w_shape: list[int], _bias: object,
                         _stride: object, _padding: object, _dilation: object, transposed: bool,
                         _output_padding: object, _groups: int, output_mask: list[bool], **_: object) -> int:
    """Each requested gradient (input, weight) of a convolution costs the forward's multiply-adds.

    Replaces torch's formula, which ignores ``groups`` for the weight gradient and so counts a
    depthwise convolution's backward (most of a MobileNet's layers) channels× too high (torch 2.14;
    pytorch/pytorch#183405 proposed dividing by ``groups``).
    """
    return (int(output_mask[0]) + int(output_mask[1])) * conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)


def _student_step_flops(setup: Setup, batch: int = 4) -> float:
    """FLOPs per tile of one training step (forward, loss, backward), counted, not assumed."""
    x = torch.rand(batch, 3, INPUT_SIZE, INPUT_SIZE).contiguous(memory_format=torch.channels_last)
    targets = Targets({TEACHER: torch.randn(batch, setup.data.sets[0].embed_dim)})
    setup.student.train()
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops}
                         ) as counter:
        terms = setup.objective(setup.student(x), targets)
        torch.stack(list(terms.values())).sum().backward()
    setup.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def run(quick: bool) -> list[dict]:
    n_slides, size, steps, repeats = (2, 2048, 3, 2) if quick else (4, 4096, 10, 3)
    with tempfile.TemporaryDirectory() as tmp:
        cohort = make_cohort(Path(tmp) / "cohort", n_slides, size=size, seed=0)
        opts = ExtractOptions(models=(TEACHER,), tiling=TILING, device="cpu", cache_pixels=(PixelSpec(224, 0.5),),
                              qc=False)
        report = run_extract([cohort.root / "slides"], Path(tmp) / "store", opts)
        if report.failed:
            raise RuntimeError(f"extraction failed: {[o.error for o in report.failed]}")
        setup = _setup(Store.open(Path(tmp) / "store", read_only=True), steps)
        teacher = build_teacher(TEACHER, device="cpu")
        online = _Online(setup.data, teacher, [setup.store.read_pixels(TILING.id, s) for s in setup.slide_ids])
        setup.epoch(setup.data)  # fills the LRU cache and warms every kernel
        floor = _InMemory(setup.batches())
        # The short variants get three times the rounds; online (ten times longer) is interleaved with the
        # warm epoch so both see the same spells of load from other jobs on the cores.
        best = best_of_interleaved({"cold": lambda: setup.epoch(setup.fresh_data()),
                                    "cache": lambda: setup.epoch(setup.data), "floor": lambda: setup.epoch(floor),
                                    "data": setup.batches}, 3 * repeats)
        paired = best_of_interleaved({"online": lambda: setup.epoch(online), "cache": lambda: setup.epoch(setup.data)},
                                     repeats)
        cold_s, floor_s, online_s = best["cold"], best["floor"], paired["online"]
        cache_s = min(best["cache"], paired["cache"])
        student_flops = _student_step_flops(setup)
        teacher_flops, _, _ = E.teacher_flops(TEACHER)
    tiles = sum(len(b.tile) for b in floor.batches)
    compute = (teacher_flops + student_flops) / student_flops
    speedup = online_s / cache_s
    teacher_rate = teacher_flops * tiles / (online_s - cache_s) / 1e9
    student_rate = student_flops * tiles / floor_s / 1e9
    case = (f"{STUDENT} @ {INPUT_SIZE} px, feature KD, batch {BATCH}, {len(setup.plan)} steps ({tiles} tiles), "
            f"{n_slides} slides, cpu, best of {3 * repeats} rounds (online {repeats})")
    return [
        row("stage two", f"{case}: student only, batches in memory (floor)", tiles / floor_s, "tiles/s"),
        row("stage two", f"{case}: from the cache, warm epoch", tiles / cache_s, "tiles/s", ratio=cache_s / floor_s,
            vs="floor (time)", target="≤ 1.15",
            note=f"batches alone take {best['data'] / floor_s:.1%} of the floor's time"),
        row("stage two", f"{case}: the cache's batches alone, no student", tiles / best["data"], "tiles/s",
            note="the data path's ceiling: it runs in the training loop, not in workers"),
        row("stage two", f"{case}: from the cache, cold epoch (store reads + resize)", tiles / cold_s, "tiles/s",
            ratio=cold_s / floor_s, vs="floor (time)", note="first epoch of a run"),
        row("stage two", f"{case}: {TEACHER} online on the same 224-px tiles", tiles / online_s, "tiles/s",
            ratio=speedup, vs="cache, warm (speedup)"),
        row("stage two", f"FLOPs per tile: {TEACHER} forward {teacher_flops / 1e9:.3f} G + student train step "
            f"{student_flops / 1e9:.3f} G, over the student step", compute, "x", ratio=speedup / compute,
            vs="speedup / compute ratio", target="≥ 0.8",
            note=f"achieved GFLOP/s: teacher forward {teacher_rate:.1f}, student step {student_rate:.1f}"),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    from benchmarks.__main__ import print_rows

    print_rows(run(parser.parse_args().quick))
