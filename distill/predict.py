"""``fs predict``: apply a trained run's heads to a store's slides and commit their outputs to it.

Every checkpoint of the run (each seed × fold) scores every slide of the matching embedding set;
each bag is read once and passed through all of them. The rows go into the store's
``predictions`` table in one atomic commit, keyed by (run_id, slide_id, seed, fold): slide
embedding, logits and score. ``held_out`` marks rows where the slide was neither trained nor
selected on by that model, so out-of-fold soft targets are one filter away — the distillation
objectives read these instead of ever running a teacher head again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from featurestore.devices import autocast, resolve_device
from featurestore.distill.data import BagDataset, BagReader, SlideSetBags
from featurestore.distill.errors import RunDirError
from featurestore.distill.runtime import Checkpoint, batches, load_checkpoint, make_loader
from featurestore.schemas import PREDICTIONS_SCHEMA, EmbeddingSet, UnknownEmbeddingSetError
from featurestore.store import Store

PREDICTIONS_TABLE = "predictions"


@dataclass(frozen=True)
class PredictResult:
    run_id: str
    commit_id: str
    slides: int
    rows: int


def load_run(run_dir: Path) -> tuple[dict, list[Path]]:
    """A finished run's resolved config and its checkpoint files."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise RunDirError(f"{config_path}: not found; pass the directory written by fs train --out")
    checkpoints = sorted((run_dir / "checkpoints").glob("seed*-fold*.pt"))
    if not checkpoints:
        raise RunDirError(f"{run_dir / 'checkpoints'}: no checkpoints; the run did not finish, train it again")
    return json.loads(config_path.read_text()), checkpoints


def matching_set(store: Store, recorded: dict) -> EmbeddingSet:
    """The store's embedding set from the same encoder and tiling as training (any dtype)."""
    sets = [es for es in store.embedding_sets()
            if es.encoder_id == recorded["encoder_id"] and es.tiling_id == recorded["tiling_id"]]
    if not sets:
        raise UnknownEmbeddingSetError(
            f"{store.root}: no embeddings from encoder {recorded['encoder_name']} ({recorded['encoder_id']}) on "
            f"tiling {recorded['tiling_id']}, which the head was trained on; extract them with fs extract "
            f"--model {recorded['encoder_name']} and the same tiling options")
    return next((es for es in sets if es.id == recorded["set_id"]), sets[0])


@torch.no_grad()
def predict(run_dir: Path, store_path: Path, *, device: str = "auto", batch_size: int = 8,
            on_progress: Callable[[str], None] | None = None) -> PredictResult:
    """Score every slide of ``store_path`` with every head of ``run_dir`` and commit a ``predictions`` table."""
    say = on_progress or (lambda _: None)
    config, paths = load_run(Path(run_dir))
    store = Store.open(store_path)
    recorded = config["embedding_set"]
    reader: BagReader | SlideSetBags
    if "slide_set" in recorded:  # a head trained on slide embeddings: bags of one vector per slide
        reader = SlideSetBags(store, recorded["set_id"])
        set_id, model, make = recorded["set_id"], recorded["slide_set"], "fs slide-encode"
    else:
        es = matching_set(store, recorded)
        reader = BagReader(store, es)
        set_id, model, make = es.id, es.encoder_name, "fs extract"
    if not reader.slide_ids:
        raise UnknownEmbeddingSetError(f"{store.root}: embedding set {set_id} has no slides; run {make} first")
    dev = resolve_device(device)
    models: list[Checkpoint] = [load_checkpoint(p, dev) for p in paths]
    say(f"{len(models)} heads × {len(reader.slide_ids)} slides on {dev}")
    ds = BagDataset(reader, reader.slide_ids, np.zeros((len(reader.slide_ids), 2)),
                    coords=any(m.head.needs_coords for m in models))
    columns: dict[str, list] = {name: [] for name in PREDICTIONS_SCHEMA.names}
    for batch in batches(make_loader(ds, batch_size), dev):
        sids = [reader.slide_ids[i] for i in batch.index.tolist()]
        n_tiles = batch.mask.sum(1).tolist()
        for m in models:
            with autocast(dev):
                out = m.head(batch.x, batch.mask, batch.coords)
            logits = out.logits.float().cpu().numpy()
            scores = m.task.score(logits)
            embedding = out.embedding.float().cpu().numpy()
            for b, sid in enumerate(sids):
                row = {"run_id": config["run_id"], "slide_id": sid, "seed": m.seed, "fold": m.fold, "set_id": set_id,
                       "model": model, "task": m.task.spec.kind, "head": m.head.cfg.name,
                       "held_out": sid not in m.train and sid not in m.val, "n_tiles": int(n_tiles[b]),
                       "logits": logits[b].tolist(), "score": float(scores[b]), "embedding": embedding[b].tolist()}
                for name, value in row.items():
                    columns[name].append(value)
    table = pa.table(columns, schema=PREDICTIONS_SCHEMA)
    with store.transaction() as txn:
        txn.add_table(PREDICTIONS_TABLE, table)
    return PredictResult(config["run_id"], txn.commit_id, len(reader.slide_ids), table.num_rows)


def read_predictions(store: Store, run_id: str | None = None) -> pa.Table:
    """The store's predictions (latest commit per key wins), optionally of one training run."""
    where = "WHERE run_id = ?" if run_id else ""
    return store.sql(f"SELECT * FROM predictions {where} ORDER BY run_id, slide_id, seed, fold",
                     [run_id] if run_id else None)
