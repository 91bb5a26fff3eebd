"""Teacher heads for logit distillation: tile-level teacher logits computed from cached embeddings.

``fs predict`` stores *slide-level* head outputs (the ``predictions`` table), one row per slide;
Hinton distillation of a tile student needs a teacher logit per tile. So the head itself is
applied to each cached tile embedding — a few multiply-adds per tile, never a teacher backbone:

- a file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``) holding ``weight`` (C, D) and ``bias`` (C,):
  a linear head on the teacher's embeddings;
- an ``fs train`` run directory: each of its MIL heads scores every tile as a one-tile bag (for
  mean/max pooling and attention MIL this is exactly the slide classifier applied to one tile),
  and the logits are averaged over the run's checkpoints (seeds × folds).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from featurestore.distill.errors import ConfigError


class LinearHead(nn.Module):
    """``logits = e Wᵀ + b`` from a stored weight and bias."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    def forward(self, e: Tensor) -> Tensor:
        return self.linear(e.float())


class SingleTileBags(nn.Module):
    """MIL heads scoring each tile alone (a bag of one); logits averaged over the heads."""

    def __init__(self, heads: list[nn.Module]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, e: Tensor) -> Tensor:
        x = e.float()[:, None, :]
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        coords = torch.zeros(*x.shape[:2], 2, dtype=torch.long, device=x.device)
        return torch.stack([h(x, mask, coords).logits.float() for h in self.heads]).mean(0)


def load_teacher_head(path: Path, teacher_dim: int) -> nn.Module:
    """The head at ``path`` (file or ``fs train`` run directory), frozen, in eval mode."""
    head = _run_dir_head(path) if path.is_dir() else _linear_head(path)
    probe = head(torch.zeros(1, teacher_dim))
    if probe.shape[1] < 2:
        raise ConfigError(f"teacher_head {path}: gives {probe.shape[1]} logit per tile; logit distillation "
                          "needs a classifier with two or more classes", field="teacher_head")
    return head.requires_grad_(False).eval()


def _linear_head(path: Path) -> LinearHead:
    if not path.is_file():
        raise ConfigError(f"teacher_head {path}: no such file or run directory; pass a linear head file or an "
                          "fs train run directory", field="teacher_head")
    try:
        state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                                weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        raise ConfigError(f"teacher_head {path}: cannot read it ({err}); save {{'weight', 'bias'}} with "
                          "safetensors or torch.save", field="teacher_head") from err
    weight, bias = (state.get("weight"), state.get("bias")) if isinstance(state, dict) else (None, None)
    if weight is None or bias is None or weight.ndim != 2 or bias.shape != weight.shape[:1]:
        raise ConfigError(f"teacher_head {path}: expected tensors 'weight' (classes, dim) and 'bias' (classes,); "
                          "save a linear head's state dict", field="teacher_head")
    return LinearHead(weight.float(), bias.float())


def _run_dir_head(path: Path) -> SingleTileBags:
    from featurestore.distill.runtime import load_checkpoint

    files = sorted((path / "checkpoints").glob("seed*-fold*.pt"))
    if not files:
        raise ConfigError(f"teacher_head {path}: no checkpoints/seed*-fold*.pt; pass a finished fs train run",
                          field="teacher_head")
    checkpoints = [load_checkpoint(f) for f in files]
    kinds = {c.task.spec.kind for c in checkpoints}
    if kinds != {"classification"}:
        raise ConfigError(f"teacher_head {path}: a {', '.join(sorted(kinds))} run; logit distillation needs an "
                          "fs train --task classification run", field="teacher_head")
    return SingleTileBags([c.head for c in checkpoints])
