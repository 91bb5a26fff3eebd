"""``fs slide-encode``: slide embeddings computed from cached tile embeddings alone.

No slide file is opened and no tile encoder runs: each slide's bag and tile coordinates are read
from the store, the slide encoder turns them into one vector, and the vectors are committed to the
``slide_features`` table as one slide embedding set. Before anything is built or written, the tile
set is checked against the encoder's contract (tile encoder, width, tile size, µm/px); a mismatch is
one line naming the ``fs extract`` command that makes the right tiles. A re-run skips slides whose
row was computed from their current bag.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from featurestore.encoders.slide import (
    SlideEncoderConfig,
    build_slide_encoder,
    slide_encoder_config,
    slide_encoder_spec,
)
from featurestore.pipelines._versions import versions
from featurestore.schemas import SLIDE_FEATURES_SCHEMA, EmbeddingSet, EncoderSpec, FsError, Run, TilingSpec, utcnow
from featurestore.schemas._record import content_id
from featurestore.store import Snapshot, Store

if TYPE_CHECKING:
    from featurestore.encoders.slide._encoder import SlideEncoder

MPP_TOLERANCE = 0.05
"""Relative µm/px difference still taken as the contract's magnification (0.5 vs 0.4999 from a slide's metadata)."""
COMMIT_EVERY = 32
"""Slides per commit: an interrupted run keeps all but the last few slides' vectors."""


class TileContractError(FsError, ValueError):
    """The tile embeddings cannot be read by the slide encoder asked for."""


@dataclass(frozen=True)
class SlideEncodeReport:
    set_id: str
    encoder: str
    tiles_encoder: str
    encoded: tuple[str, ...]
    skipped: tuple[str, ...]
    seconds: float
    run_id: str


def slide_set_id(spec: EncoderSpec, es: EmbeddingSet) -> str:
    """A slide embedding set is identified by the slide encoder (with its weights) and the tile set it read."""
    return content_id({"slide_encoder": spec.id, "tiles": es.id})


def check_contract(config: SlideEncoderConfig, es: EmbeddingSet, tiling: TilingSpec) -> None:
    """Refuse tiles the encoder was not trained on, in one line that names the command making the right ones."""
    contract = config.contract
    if contract is None:
        return
    problems = []
    if es.encoder_name != contract.tile_encoder:
        problems.append(f"tile encoder {es.encoder_name}, not {contract.tile_encoder}")
    if es.embed_dim != contract.embed_dim:
        problems.append(f"{es.embed_dim}-d embeddings, not {contract.embed_dim}-d")
    if tiling.tile_size != contract.tile_size:
        problems.append(f"{tiling.tile_size} px tiles, not {contract.tile_size} px")
    if abs(tiling.target_mpp - contract.mpp) > MPP_TOLERANCE * contract.mpp:
        problems.append(f"{tiling.target_mpp:g} µm/px, not {contract.mpp:g} µm/px")
    if contract.coords and tiling.overlap:
        problems.append(f"tiles overlapping by {tiling.overlap} px, not on a grid")
    if problems:
        raise TileContractError(
            f"{config.name} reads {contract.tile_encoder} embeddings of {contract.tile_size} px tiles at "
            f"{contract.mpp:g} µm/px, but this set has {', '.join(problems)}; make those tiles with "
            f"`{contract.extract_command()}` and pass --tiles {contract.tile_encoder}")


def patch_size_level0(tiling: TilingSpec, slide_mpp: float) -> int:
    """A tile's footprint in level-0 pixels (TRIDENT's ``patch_size_level0``), as tiling computes it."""
    return max(1, round(tiling.tile_size * tiling.target_mpp / slide_mpp))


def _done(snap: Snapshot, set_id: str) -> dict[str, str]:
    """slide_id → the bag commit its current row was computed from."""
    rows = snap.sql("SELECT slide_id, bag_commit_id FROM slide_features WHERE set_id = ? "
                    "QUALIFY row_number() OVER (PARTITION BY slide_id ORDER BY commit_id DESC) = 1",
                    [set_id]).to_pylist()
    return {r["slide_id"]: r["bag_commit_id"] for r in rows}


def _rows(set_id: str, spec: EncoderSpec, es: EmbeddingSet, rows: list[tuple[str, str, int, np.ndarray]]
          ) -> pa.Table:
    schema = SLIDE_FEATURES_SCHEMA
    return pa.table({
        "set_id": pa.array([set_id] * len(rows), pa.string()),
        "slide_id": pa.array([r[0] for r in rows], pa.string()),
        "encoder": pa.array([spec.name] * len(rows), pa.string()),
        "encoder_id": pa.array([spec.id] * len(rows), pa.string()),
        "tiles_set_id": pa.array([es.id] * len(rows), pa.string()),
        "bag_commit_id": pa.array([r[1] for r in rows], pa.string()),
        "n_tiles": pa.array([r[2] for r in rows], pa.int64()),
        "embedding": pa.array([r[3].astype(np.float32) for r in rows], schema.field("embedding").type),
    }, schema=schema)


def plan(store: Store, tiles: str, encoder: str) -> tuple[Snapshot, EmbeddingSet, TilingSpec, SlideEncoderConfig]:
    """Resolve the tile set and the encoder and check the contract: everything that can refuse, before any build."""
    snap = store.snapshot()
    es = snap.embedding_set(tiles)
    tiling = next(t for t in snap.tilings() if t.id == es.tiling_id)
    config = slide_encoder_config(encoder)
    check_contract(config, es, tiling)
    return snap, es, tiling, config


def run_slide_encode(store_path: str | Path, tiles: str, encoder: str, *, weights: str | Path | None = None,
                     device: str = "cpu", command: str = "", on_slide: Callable[[str], None] | None = None,
                     ) -> SlideEncodeReport:
    """Encode every slide of tile set ``tiles`` with slide encoder ``encoder`` and commit the vectors."""
    store = Store.open(store_path)
    snap, es, tiling, config = plan(store, tiles, encoder)
    shape = {"in_dim": es.embed_dim, "tile_size": tiling.tile_size, "weights": weights, "device": device}
    spec = slide_encoder_spec(encoder, **shape)
    set_id = slide_set_id(spec, es)
    bags = snap.bag_commits(es)
    done = _done(snap, set_id)
    todo = [sid for sid, commit in bags.items() if done.get(sid) != commit]
    model = build_slide_encoder(encoder, **shape) if todo else None
    run = Run(run_id=f"run-{time.time_ns()}-{os.getpid()}", command=command or f"slide-encode {encoder}",
              versions=versions("featurestore-path", "torch", "numpy"), host=socket.gethostname(),
              started_at=utcnow())
    t0 = time.perf_counter()
    known = {e.id for e in snap.encoders()}
    store.register(run, *([spec] if spec.id not in known else []))
    mpp = {s.slide_id: s.mpp_x for s in snap.slides()}
    status = "failed"
    try:
        for start in range(0, len(todo), COMMIT_EVERY):
            chunk = todo[start:start + COMMIT_EVERY]
            rows = [(sid, bags[sid], *_encode(snap, es, tiling, model, sid, mpp[sid], on_slide)) for sid in chunk]
            with store.transaction() as txn:
                txn.add_table("slide_features", _rows(set_id, spec, es, rows))
        status = "ok"
    finally:
        store.register(Run(run.run_id, run.command, run.versions, run.host, run.started_at, utcnow(),
                           time.perf_counter() - t0, 0.0, status))
    skipped = tuple(sid for sid in bags if done.get(sid) == bags[sid])
    return SlideEncodeReport(set_id, config.name, es.encoder_name, tuple(todo), skipped, time.perf_counter() - t0,
                             run.run_id)


def _encode(snap: Snapshot, es: EmbeddingSet, tiling: TilingSpec, model: SlideEncoder, slide_id: str,
            slide_mpp: float, on_slide: Callable[[str], None] | None) -> tuple[int, np.ndarray]:
    bag = snap.read_bag(es, slide_id)
    features = bag[:, 0] if bag.ndim == 3 else bag
    tiles = snap.read_tiles(es.tiling_id, slide_id, columns=["x", "y"])
    coords = np.stack([tiles.column("x").to_numpy(), tiles.column("y").to_numpy()], axis=1)
    vector = model(features, coords, patch_size_level0(tiling, slide_mpp))
    if on_slide:
        on_slide(slide_id)
    return len(features), vector
