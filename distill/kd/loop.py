"""One pass of the student over a plan of cached batches, training or measuring, and what it needs.

On CUDA the student runs under ``featurestore.devices``' autocast (bfloat16, else float16 with loss
scaling); on CPU a fixed seed reproduces a pass bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from featurestore.devices import autocast
from featurestore.distill.kd.config import DistillConfig
from featurestore.distill.kd.data import DIHEDRAL_VIEWS, Batch, CachedTiles, dihedral_each, to_student
from featurestore.distill.kd.objectives import Objective, StudentOutput, Targets
from featurestore.distill.kd.students import Student


class TargetScaling:
    """Teacher targets centred on their training mean and divided by their RMS deviation from it.

    Embeddings of ReLU networks are all positive, so raw targets are dominated by their mean (a
    constant predictor already has a cosine of about 0.8 to them); centred, every objective fits what
    differs between tiles. The exported projection folds the scaling back (``fold``), so the
    student still embeds in its teacher's own space.
    """

    def __init__(self, stats: dict[str, tuple[np.ndarray, float]], device: torch.device) -> None:
        self.mean = {k: torch.from_numpy(m).to(device) for k, (m, _) in stats.items()}
        self.scale = {k: s for k, (_, s) in stats.items()}

    def __call__(self, teachers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (t - self.mean[k]) / self.scale[k] for k, t in teachers.items()}

    def unscale(self, name: str, z: torch.Tensor) -> torch.Tensor:
        return z * self.scale[name] + self.mean[name]

    def fold(self, name: str, linear: nn.Linear) -> nn.Linear:
        """``linear`` followed by ``unscale``, as one linear layer."""
        out = nn.Linear(linear.in_features, linear.out_features).to(linear.weight.device)
        with torch.no_grad():
            out.weight.copy_(linear.weight * self.scale[name])
            out.bias.copy_(self.unscale(name, linear.bias))
        return out


def _targets(batch: Batch, teacher_head: nn.Module | None, primary: str, scaling: TargetScaling | None,
             second_view: StudentOutput | None) -> Targets:
    """The objective's view of a batch: scaled teacher embeddings, and head logits from the raw ones."""
    logits = None
    if teacher_head is not None:
        with torch.no_grad():
            logits = teacher_head(batch.teachers[primary])
    teachers = scaling(batch.teachers) if scaling is not None else batch.teachers
    return Targets(teachers, batch.child_mask, batch.labels, logits, batch.regions, second_view)


def primary_target(batch: Batch, primary: str) -> torch.Tensor:
    """The primary teacher's embedding of each tile; for XMAG the mean of the existing children."""
    t = batch.teachers[primary]
    if batch.child_mask is None:
        return t
    mask = batch.child_mask.float()
    return (t * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


@dataclass
class PassResult:
    """Sums of one pass over batches: loss terms, cosine to the primary teacher, targets consumed."""

    terms: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    cosine_sum: float = 0.0
    tiles: int = 0
    targets: int = 0

    def add(self, terms: dict[str, torch.Tensor], batch: Batch) -> None:
        for k, v in terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + float(v.detach())
        self.steps += 1
        self.targets += int(batch.child_mask.sum()) if batch.child_mask is not None else len(batch.tile)

    @property
    def loss(self) -> float:
        return sum(self.terms.values()) / max(self.steps, 1)

    @property
    def cosine(self) -> float | None:
        return self.cosine_sum / self.tiles if self.tiles else None


def run_pass(student: Student, objective: Objective, data: CachedTiles, plan: list[np.ndarray], *,
             cfg: DistillConfig, device: torch.device, teacher_head: nn.Module | None, primary: str,
             scaling: TargetScaling | None, optimizer: torch.optim.Optimizer | None = None,
             scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
             scaler: torch.amp.GradScaler | None = None, seed: int = 0) -> PassResult:
    """Train on (with ``optimizer``) or evaluate ``plan``'s batches; returns the pass's sums. Public
    for ``benchmarks/bench_distill.py``, which times this very loop against its alternatives."""
    training = optimizer is not None
    student.train(training)
    objective.train(training)
    generator = torch.Generator().manual_seed(seed)
    augment = cfg.augment if training else None
    projection = objective.export_projection()
    result = PassResult()
    for batch in data.iterate(plan, augment=augment, seed=seed):
        batch = batch.to(device)
        x = to_student(batch.pixels, student.spec.mean, student.spec.std, augment=augment, generator=generator)
        with torch.set_grad_enabled(training), autocast(device):
            out = student(x)
            second = None
            if objective.views == 2:
                views = torch.randint(0, DIHEDRAL_VIEWS, (len(x),), generator=generator) if augment else \
                    torch.zeros(len(x), dtype=torch.long)
                second = student(to_student(dihedral_each(batch.pixels, views.to(batch.pixels.device)),
                                            student.spec.mean, student.spec.std, augment=augment, generator=generator))
            terms = objective(out, _targets(batch, teacher_head, primary, scaling, second))
        loss = torch.stack([v.float() for v in terms.values()]).sum()
        if training:
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
        elif projection is not None:
            with torch.no_grad():
                z = projection(out.embedding.float())
                z = scaling.unscale(primary, z) if scaling is not None else z
                cos = torch.nn.functional.cosine_similarity(z, primary_target(batch, primary), dim=1)
            result.cosine_sum += float(cos.sum())
            result.tiles += len(cos)
        result.add(terms, batch)
    return result
