"""Slide embedding sets written by ``fs slide-encode`` (the ``slide_features`` table): named, read, searched.

A set holds one vector per slide, so search is an exact cosine scan over the set's rows; no FAISS
index is needed (a cohort of 100k slides × 768 is a 300 MB matrix product).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from featurestore.index._errors import QueryError
from featurestore.schemas import UnknownEmbeddingSetError
from featurestore.store import Snapshot, Store

TABLE = "slide_features"
LATEST = (f"SELECT * EXCLUDE (commit_id) FROM {TABLE} "
          "QUALIFY row_number() OVER (PARTITION BY set_id, slide_id ORDER BY commit_id DESC) = 1")
"""One row per (set, slide), the latest commit's (the store's view may already keep only that one)."""


@dataclass(frozen=True)
class SlideSet:
    """A slide embedding set: encoder ``encoder`` (spec ``encoder_id``) over tile set ``tiles_set_id``, whose
    tiles were cut with tiling ``tiling_id`` (None once that tile set is gone from the store)."""

    set_id: str
    encoder: str
    encoder_id: str
    tiles_set_id: str
    tiles_encoder: str
    tiling_id: str | None
    embed_dim: int
    slides: int

    @property
    def name(self) -> str:
        """``<slide encoder>:<tile encoder>``, e.g. ``titan:conch-v1.5``."""
        return f"{self.encoder}:{self.tiles_encoder}"


def slide_sets(store: Store | Snapshot) -> list[SlideSet]:
    """Every slide embedding set in the store, by name."""
    snap = store.snapshot() if isinstance(store, Store) else store
    tiles = {es.id: es for es in snap.embedding_sets()}
    rows = snap.sql(f"SELECT set_id, any_value(encoder) AS encoder, any_value(encoder_id) AS encoder_id, "
                    f"any_value(tiles_set_id) AS tiles_set_id, any_value(len(embedding)) AS dim, count(*) AS n "
                    f"FROM ({LATEST}) GROUP BY set_id").to_pylist()
    found = []
    for r in rows:
        es = tiles.get(r["tiles_set_id"])
        found.append(SlideSet(r["set_id"], r["encoder"], r["encoder_id"], r["tiles_set_id"],
                              es.encoder_name if es else r["tiles_set_id"], es.tiling_id if es else None, r["dim"],
                              r["n"]))
    return sorted(found, key=lambda s: (s.name, s.set_id))


def slide_set(store: Store | Snapshot, model: str) -> SlideSet:
    """Resolve a slide embedding set by ``<encoder>:<tile encoder>``, slide encoder name or set id (prefix)."""
    sets = slide_sets(store)
    matches = [s for s in sets if model in (s.name, s.encoder) or s.set_id.startswith(model)]
    if len(matches) == 1:
        return matches[0]
    choices = ", ".join(f"{s.name} (set {s.set_id})" for s in sets) or "none yet (run fs slide-encode)"
    why = "is ambiguous" if matches else "matches no slide embedding set"
    raise UnknownEmbeddingSetError(f"model {model!r} {why}; choose one of: {choices}")


def is_slide_set(store: Store | Snapshot, model: str) -> bool:
    """Whether ``model`` names a slide embedding set rather than a tile embedding set."""
    try:
        (store.snapshot() if isinstance(store, Store) else store).embedding_set(model)
    except UnknownEmbeddingSetError:
        return any(model in (s.name, s.encoder) or s.set_id.startswith(model) for s in slide_sets(store))
    return False


def read_slide_set(store: Store | Snapshot, ss: SlideSet) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Slide ids (sorted), their vectors ``(n, dim)`` float32 and tile counts, for one slide set."""
    snap = store.snapshot() if isinstance(store, Store) else store
    table = snap.sql(f"SELECT slide_id, n_tiles, embedding FROM ({LATEST}) WHERE set_id = ? ORDER BY slide_id",
                     [ss.set_id])
    vectors = np.array(table.column("embedding").to_pylist(), np.float32).reshape(table.num_rows, ss.embed_dim)
    return table.column("slide_id").to_pylist(), vectors, table.column("n_tiles").to_numpy()


def search_slide_set(store: Store | Snapshot, model: str, slide_id: str, k: int,
                     allowed: set[str] | None = None) -> pa.Table:
    """Slides ranked by the cosine similarity of their embeddings to ``slide_id``'s: rank, score, slide_id, n_tiles."""
    ss = slide_set(store, model)
    ids, vectors, n_tiles = read_slide_set(store, ss)
    if slide_id not in ids:
        raise QueryError(f"slide {slide_id} has no embedding in {ss.name} (set {ss.set_id}); run fs slide-encode "
                         f"for it, or list the set's slides: fs sql \"SELECT slide_id FROM slide_features WHERE "
                         f"set_id = '{ss.set_id}'\"")
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    scores = unit @ unit[ids.index(slide_id)]
    keep = np.array([i for i, s in enumerate(ids) if allowed is None or s in allowed], np.int64)
    order = keep[np.argsort(-scores[keep], kind="stable")][:k]
    return pa.table({"rank": pa.array(np.arange(1, len(order) + 1), pa.int32()),
                     "score": pa.array(scores[order], pa.float32()),
                     "slide_id": pa.array([ids[i] for i in order], pa.string()),
                     "n_tiles": pa.array(n_tiles[order], pa.int64())})
