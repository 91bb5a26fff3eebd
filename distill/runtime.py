"""Running heads: loaders, batched inference, and checkpoints.

Shared by training, reports and ``fs predict`` so a head scores a slide the same way everywhere.
Forward passes autocast as ``featurestore.devices`` decides; the outputs handed back are float32.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from featurestore.devices import autocast
from featurestore.distill.data import BagBatch, BagDataset, collate_bags
from featurestore.distill.errors import RunDirError
from featurestore.distill.mil import HeadConfig, MILHead, build_head
from featurestore.distill.tasks import Task, task_from_dict

CHECKPOINT_FORMAT = 1


def make_loader(ds: BagDataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                workers: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=workers,
                      collate_fn=collate_bags, pin_memory=torch.cuda.is_available())


def batches(loader: DataLoader, device: torch.device) -> Iterator[BagBatch]:
    for batch in loader:
        yield batch.to(device)


@dataclass(frozen=True, eq=False)
class Inference:
    """Per slide, in dataset order: ``outputs`` (n, k) and ``embeddings`` (n, E), float32."""

    outputs: np.ndarray
    embeddings: np.ndarray


@torch.no_grad()
def infer(head: MILHead, loader: DataLoader, device: torch.device) -> Inference:
    head.eval()
    n = len(loader.dataset)  # type: ignore[arg-type]
    outputs: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    for batch in batches(loader, device):
        with autocast(device):
            out = head(batch.x, batch.mask, batch.coords)
        if outputs is None or embeddings is None:
            outputs = np.zeros((n, out.logits.shape[1]), np.float32)
            embeddings = np.zeros((n, out.embedding.shape[1]), np.float32)
        outputs[batch.index.numpy()] = out.logits.float().cpu().numpy()
        embeddings[batch.index.numpy()] = out.embedding.float().cpu().numpy()
    if outputs is None or embeddings is None:
        raise ValueError("no slides to run the head on")
    return Inference(outputs, embeddings)


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A trained head (in eval mode) with its fitted task and the slides of its split."""

    head: MILHead
    task: Task
    seed: int
    fold: int
    best_epoch: int
    train: frozenset[str]
    val: frozenset[str]
    test: frozenset[str]


def save_checkpoint(path: Path, head: MILHead, task: Task, *, in_dim: int, seed: int, fold: int, best_epoch: int,
                    train: list[str], val: list[str], test: list[str]) -> None:
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT, "head": asdict(head.cfg), "in_dim": in_dim, "task": task.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "seed": seed, "fold": fold, "best_epoch": best_epoch, "train": train, "val": val, "test": test,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> Checkpoint:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as err:
        raise RunDirError(f"{path}: cannot read checkpoint ({err}); re-run fs train to recreate it") from err
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise RunDirError(f"{path}: checkpoint format {payload.get('format')} is not {CHECKPOINT_FORMAT}; "
                          "re-train with this version")
    task = task_from_dict(payload["task"])
    head = build_head(HeadConfig(**payload["head"]), payload["in_dim"], task.readout, task.n_classes)
    head.load_state_dict(payload["state_dict"])
    head.to(device).eval()
    return Checkpoint(head, task, payload["seed"], payload["fold"], payload["best_epoch"],
                      frozenset(payload["train"]), frozenset(payload["val"]), frozenset(payload["test"]))
