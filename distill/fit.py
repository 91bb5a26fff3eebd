"""The one fit loop of slide models: ``fs train``'s heads, ``fs distill-slides``' students and ``fs amkd``'s
teacher, baseline and students.

AdamW on a ``Loss`` for at most ``schedule.epochs`` epochs. After each epoch the caller's validation
signal is measured in eval mode; the weights of the epoch where it was lowest are kept, and training
stops after ``patience`` epochs without improvement. With ``window`` > 1 the signal is the mean over the
last ``window`` epochs and the kept weights are the average of those epochs' weights: on a validation
split of a handful of slides the loss of single epochs is mostly noise, and picking its minimum picks
the luckiest epoch, while a window's mean is steadier and its averaged weights generalise better
(stochastic weight averaging, Izmailov et al. 2018). Without a validation split the last epoch is
kept. On CUDA forward passes autocast (``featurestore.devices``) and float16 steps scale the loss;
losses are computed in float32.

A ``Loss`` is the task loss of the outputs, with CLAM's instance loss mixed in as
(1 − w)·task + w·instance (w = ``HeadConfig.instance_weight``, CLAM's ``bag_weight`` is 1 − w), plus
``weight`` times an auxiliary term: the cross-cohort bank or soft-label term, or AMKD's distillation
term. Forward passes and auxiliary terms take the cohort rows of the batch's slides, which is how
they look up per-slide targets.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from featurestore.devices import autocast, grad_scaler
from featurestore.distill.data import BagBatch, BagDataset
from featurestore.distill.mil import HeadOutput, MILHead
from featurestore.distill.runtime import batches, infer, make_loader
from featurestore.distill.schedule import Schedule

Forward = Callable[[BagBatch, np.ndarray, bool], HeadOutput]
"""(batch, cohort rows of its slides, training) → outputs."""

Aux = Callable[[HeadOutput, BagBatch, np.ndarray], Tensor]
"""(outputs, batch, cohort rows) → the auxiliary term, a float32 scalar."""


def head_forward(head: nn.Module, instance_labels: Callable[[Tensor], Tensor | None]) -> Forward:
    """A MIL head's forward pass; heads with an instance loss (CLAM) get the bag classes while training."""

    def forward(batch: BagBatch, rows: np.ndarray, training: bool) -> HeadOutput:
        return head(batch.x, batch.mask, batch.coords, instance_labels(batch.y))

    return forward


@dataclass(frozen=True, eq=False)
class Loss:
    """task(logits, y), mixed with the head's instance loss by ``instance_weight``, + ``weight`` × ``aux``."""

    forward: Forward
    task: Callable[[Tensor, Tensor], Tensor]
    instance_weight: float = 0.0
    aux: Aux | None = None
    weight: float = 0.0

    def __call__(self, batch: BagBatch, rows: np.ndarray, training: bool) -> Tensor:
        with autocast(batch.x.device):
            out = self.forward(batch, rows, training)
        loss = self.task(out.logits.float(), batch.y)
        if out.aux_loss is not None:
            loss = (1 - self.instance_weight) * loss + self.instance_weight * out.aux_loss.float()
        if self.aux is not None and self.weight:
            loss = loss + self.weight * self.aux(out, batch, rows)
        return loss


@dataclass(frozen=True)
class Fitted:
    """The kept epoch (the last one without a validation split; −1 after zero epochs) and, per epoch
    run, ``epoch``, ``train_loss`` and, with a validation split, ``val_loss``."""

    best_epoch: int
    history: list[dict[str, float]]


def fit(model: nn.Module, loss: Loss, train: BagDataset, rows: np.ndarray, validate: Callable[[], float] | None,
        schedule: Schedule, patience: int, device: torch.device, seed: int, workers: int = 0,
        window: int = 1) -> Fitted:
    """Train ``model`` (every parameter, in place) on ``train``, whose items are the cohort rows ``rows``;
    ``validate`` returns the validation signal, averaged with its ``window`` − 1 predecessors. Leaves
    ``model`` in eval mode with its best weights (the average over the best window); ``best_epoch`` is the
    window's last epoch."""
    opt = torch.optim.AdamW(model.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    scaler = grad_scaler(device)
    loader = make_loader(train, schedule.batch_size, shuffle=True, seed=seed, workers=workers)
    best_loss, best_epoch, best_state, waited = float("inf"), schedule.epochs - 1, None, 0
    recent: deque[tuple[float, dict[str, Tensor]]] = deque(maxlen=window)
    history: list[dict[str, float]] = []
    for epoch in range(schedule.epochs):
        train.set_epoch(epoch)
        model.train()
        losses = []
        for batch in batches(loader, device):
            step = loss(batch, rows[batch.index.numpy()], True)
            opt.zero_grad(set_to_none=True)
            scaler.scale(step).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(step.detach().item())
        row = {"epoch": epoch, "train_loss": float(np.mean(losses))}
        if validate is not None:
            model.eval()
            row["val_loss"] = validate()
            recent.append((row["val_loss"], {k: v.detach().clone() for k, v in model.state_dict().items()}))
            smoothed = float(np.mean([v for v, _ in recent]))
            if smoothed < best_loss:
                best_loss, best_epoch, waited = smoothed, epoch, 0
                best_state = _average([state for _, state in recent])
            else:
                waited += 1
        history.append(row)
        if waited >= patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return Fitted(best_epoch, history)


def _average(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The mean of state dicts; integer buffers (counters) are taken from the last one."""
    if len(states) == 1:
        return states[0]
    return {k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v
            for k, v in states[-1].items()}


def task_loss_on(head: MILHead | nn.Module, task_loss: Callable[[Tensor, Tensor], Tensor], ds: BagDataset,
                 batch_size: int, device: torch.device, workers: int = 0) -> Callable[[], float]:
    """The task loss of ``head``'s outputs on all of ``ds``: the validation signal of heads whose other
    terms are stochastic (CLAM's instance sampling, a bank's triplets) or absent."""
    loader = make_loader(ds, batch_size, workers=workers)
    targets = torch.from_numpy(ds.targets)
    return lambda: float(task_loss(torch.from_numpy(infer(head, loader, device).outputs), targets))


def loss_on(loss: Loss, ds: BagDataset, rows: np.ndarray, device: torch.device) -> Callable[[], float]:
    """The whole ``loss`` on ``ds`` (cohort rows ``rows``) as one batch, without gradients: the validation
    signal of objectives that must see every validation patient at once (Cox, batch-standardised KD)."""
    loader = make_loader(ds, len(ds))

    def signal() -> float:
        with torch.no_grad():
            return float(sum(loss(b, rows[b.index.numpy()], False) for b in batches(loader, device)))

    return signal
