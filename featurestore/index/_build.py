"""Build, extend and load the FAISS index of an embedding set, and its per-slide pooled vectors.

A build snapshots the set's bags (slide + bag commit) before reading any vector, so a
slide re-written during the build is recorded with its older commit and shows up as
stale afterwards: the index may be flagged stale needlessly, never used stale silently.
New slides are added to the existing index (an IVF quantizer is trained once); a
re-written or removed slide forces a rebuild, which the report says.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from featurestore.index import _faiss
from featurestore.index._errors import (
    IndexBuildError,
    IndexConfigError,
    IndexMissingError,
    StaleIndexError,
)
from featurestore.index._faiss import TRAIN_POINTS_PER_LIST, IndexParams, default_params, normalize
from featurestore.index._kinds import EXACT_BELOW
from featurestore.index._manifest import (
    MANIFEST,
    BagVersion,
    IndexRequest,
    IndexStatus,
    Manifest,
    diff,
    index_dir,
    new_build_id,
    read_manifest,
    write_atomic,
    write_manifest,
)
from featurestore.schemas import SLIDE_EMBEDDINGS_SCHEMA, EmbeddingSet, ReadOnlyError, utcnow
from featurestore.store import Snapshot, Store

POOLED_TABLE = "slide_embeddings"
POOLED_SCHEMA = SLIDE_EMBEDDINGS_SCHEMA

EXACT_FILTER_MAX = 20_000
"""A filter allowing at most this many tiles is answered exactly from the store's vectors: an approximate
index can miss most of a small allowed set, and scoring 20k vectors takes a fraction of a second."""

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class BuildReport:
    """What ``build_index`` did and why."""

    set_id: str
    encoder_name: str
    action: str
    reason: str
    params: IndexParams
    slides_added: int
    vectors_added: int
    n_slides: int
    n_vectors: int
    device: str
    seconds: float
    notes: tuple[str, ...] = ()


def quote(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def first_view(emb: np.ndarray) -> np.ndarray:
    """(n, dim) vectors of a bag; a set with several augmented views per tile is indexed by its first view."""
    return emb[:, 0] if emb.ndim == 3 else emb


def current_bags(store: Store | Snapshot, es: EmbeddingSet) -> tuple[BagVersion, ...]:
    rows = store.sql(f"SELECT slide_id, commit_id, n_tiles FROM bags WHERE set_id = {quote(es.id)} "
                     "ORDER BY slide_id").to_pylist()
    return tuple(BagVersion(r["slide_id"], r["commit_id"], r["n_tiles"]) for r in rows)


def index_status(store: Store | Snapshot, model: str) -> tuple[Manifest | None, IndexStatus]:
    """The set's index manifest (None when never built) and how the set has changed since."""
    store = store.snapshot() if isinstance(store, Store) else store
    es = store.embedding_set(model)
    directory = index_dir(store.root, es.id)
    manifest = read_manifest(directory)
    status = diff(manifest.bags if manifest else (), current_bags(store, es))
    if manifest is not None and not (directory / manifest.index_file).is_file():
        status = dataclasses.replace(status, file_missing=True)
    return manifest, status


def _pool(vectors: np.ndarray) -> np.ndarray:
    return normalize(vectors.mean(axis=0, keepdims=True))[0]


def _training_sample(snap: Snapshot, es: EmbeddingSet, bags: tuple[BagVersion, ...], size: int) -> np.ndarray:
    """A uniform random sample (fixed seed, so rebuilds are repeatable) of the set's unit vectors."""
    n = sum(b.n_tiles for b in bags)
    picks = np.sort(np.random.default_rng(0).choice(n, min(n, size), replace=False))
    starts = np.cumsum([0] + [b.n_tiles for b in bags])
    where = {b.slide_id: (starts[i], b.n_tiles) for i, b in enumerate(bags)}
    parts = []
    for slide_id, (start, count) in where.items():
        emb = snap.read_bag(es, slide_id)
        rows = picks[(picks >= start) & (picks < start + count)] - start
        parts.append(normalize(first_view(emb)[rows[rows < emb.shape[0]]]))
    return np.concatenate(parts)


def _fill(snap: Snapshot, es: EmbeddingSet, index: faiss.Index, wanted: set[str],
          progress: Progress | None) -> list[tuple[str, np.ndarray, int]]:
    """Add the wanted slides' unit vectors under their tile ids; return (slide, pooled vector, tiles)."""
    pooled = []
    for slide_id in sorted(wanted):
        vectors = normalize(first_view(snap.read_bag(es, slide_id)))
        ids = snap.read_tiles(es.tiling_id, slide_id, columns=["tile_id"]).column("tile_id").to_numpy()
        index.add_with_ids(vectors, ids)
        pooled.append((slide_id, _pool(vectors), len(vectors)))
        if progress:
            progress(len(pooled), len(wanted))
    return pooled


def _commit_pooled(store: Store, snap: Snapshot, es: EmbeddingSet, bags: dict[str, BagVersion],
                   pooled: list[tuple[str, np.ndarray, int]]) -> None:
    """Commit pooled vectors not yet stored for these bag versions (a rebuild re-stores nothing)."""
    stored = snap.sql(f"SELECT slide_id, bag_commit_id FROM {POOLED_TABLE} WHERE set_id = ?", [es.id])
    have = set(zip(stored.column("slide_id").to_pylist(), stored.column("bag_commit_id").to_pylist(), strict=True))
    new = [(s, v, n) for s, v, n in pooled if (s, bags[s].commit_id) not in have]
    if not new:
        return
    table = pa.table([[es.id] * len(new), [s for s, _, _ in new], [bags[s].commit_id for s, _, _ in new],
                      [n for _, _, n in new], [v.tolist() for _, v, _ in new]], schema=POOLED_SCHEMA)
    with store.transaction() as txn:
        txn.add_table(POOLED_TABLE, table)


def _request(old: Manifest | None, kind: str | None, given: dict[str, int]) -> IndexRequest:
    """Merge a new request into the recorded one: a new kind starts afresh, overrides accumulate."""
    if old is None or kind is not None:
        return IndexRequest(kind, tuple(sorted(given.items())))
    return IndexRequest(old.request.kind, tuple(sorted((dict(old.request.overrides) | given).items())))


def _conflicts(params: IndexParams, kind: str | None, given: dict[str, int]) -> str:
    """Why the asked-for layout differs from the built one ('' when it does not)."""
    if kind is not None and kind != params.kind:
        return f"kind changed from {params.kind} to {kind}"
    changed = [f"{k} {getattr(params, k)} → {v}" for k, v in given.items() if getattr(params, k) != v]
    return ", ".join(changed)


def build_index(store: Store, model: str, *, kind: str | None = None, gpu: bool | None = None,
                rebuild: bool = False, progress: Progress | None = None,
                **overrides: int | None) -> BuildReport:
    """Build the index of an embedding set, or bring it up to date.

    ``kind`` (one of ``featurestore.index.KINDS``) and ``overrides`` (nlist, nprobe, pq_m, pq_bits, rerank,
    hnsw_m, ef_construction, ef_search) default by size (see ``IndexParams``) and are remembered,
    so later builds keep them. ``gpu``: None uses a GPU when FAISS has one, True requires it.
    Only new slides are added to an existing index; a re-written slide, a changed layout or
    ``rebuild`` builds it afresh.
    """
    t0 = time.perf_counter()
    if store.read_only:
        raise ReadOnlyError(f"{store.root}: store was opened read-only; building an index writes to it")
    snap = store.snapshot()
    es = snap.embedding_set(model)
    directory = index_dir(store.root, es.id)
    old = _readable_manifest(directory, rebuild)
    current = current_bags(snap, es)
    if not current:
        raise IndexBuildError(f"{store.root}: embedding set {es.encoder_name} ({es.id}) has no slides yet; "
                              "add some with fs extract or fs import")
    given = {k: v for k, v in overrides.items() if v is not None}
    request = _request(old, kind, given)
    n = sum(b.n_tiles for b in current)
    use_gpu = _faiss.resolve_gpu(gpu)
    status = diff(old.bags, current) if old else IndexStatus(added=tuple(b.slide_id for b in current))
    conflict = _conflicts(old.params, kind, given) if old else ""
    unextendable = "" if status.extendable else f"{status.describe()}; old vectors are not replaced in place"
    reason = ("no index yet" if old is None else "--rebuild asked" if rebuild else conflict or unextendable)
    if old is not None and not reason and status.fresh:
        return BuildReport(es.id, es.encoder_name, "up to date", "no slide added or re-written", old.params,
                           0, 0, len(current), old.n_vectors, old.device, time.perf_counter() - t0)
    bags = {b.slide_id: b for b in current}
    if old is not None and not reason:
        action, params, trained_on = "extended", old.params, old.trained_on
        wanted = set(status.added)
        index = faiss.read_index(str(directory / old.index_file))
        reason = status.describe()
    else:
        action = "built" if old is None else "rebuilt"
        params = default_params(n, es.embed_dim, request.kind, **dict(request.overrides))
        wanted = set(bags)
        index = _faiss.new_index(params, es.embed_dim)
        trained_on = 0
    work, device = _faiss.on_device(index, use_gpu)
    if not work.is_trained:
        _check_trainable(params, n)
        sample = _training_sample(snap, es, current, params.nlist * TRAIN_POINTS_PER_LIST)
        work.train(sample)
        trained_on = len(sample)
    pooled = _fill(snap, es, work, wanted, progress)
    index = _faiss.to_cpu(work)
    indexed = tuple(sorted((old.bags if action == "extended" else ()) + tuple(bags[s] for s in wanted),
                           key=lambda b: b.slide_id))
    _commit_pooled(store, snap, es, bags, pooled)
    file = f"{new_build_id()}.faiss"
    write_atomic(directory / file, lambda tmp: faiss.write_index(index, str(tmp)))
    now = utcnow().isoformat()
    manifest = Manifest(es.id, es.encoder_name, es.embed_dim, params, request, file, indexed, trained_on,
                        device, faiss.__version__, old.built_at if action == "extended" else now, now)
    write_manifest(directory, manifest)
    if old is not None:
        (directory / old.index_file).unlink(missing_ok=True)
    return BuildReport(es.id, es.encoder_name, action, reason, params, len(wanted),
                       sum(bags[s].n_tiles for s in wanted), len(indexed), manifest.n_vectors, device,
                       time.perf_counter() - t0, _advice(manifest))


def _readable_manifest(directory: Path, rebuild: bool) -> Manifest | None:
    """The recorded index; a missing index file, and with ``rebuild`` a damaged manifest, count as none."""
    try:
        old = read_manifest(directory)
    except StaleIndexError:
        if not rebuild:
            raise
        return None
    if old is not None and not (directory / old.index_file).is_file():
        return None
    return old


def _check_trainable(params: IndexParams, n: int) -> None:
    if params.nlist is not None and params.nlist > n:
        raise IndexConfigError(f"--nlist {params.nlist} needs at least {params.nlist} vectors to train; "
                               f"the set has {n}: lower --nlist or use --kind flat")
    if params.pq_bits is not None and 2 ** params.pq_bits > n:
        raise IndexConfigError(f"--pq-bits {params.pq_bits} needs at least {2 ** params.pq_bits} vectors to "
                               f"train; the set has {n}: lower --pq-bits or use --kind flat")


def _advice(m: Manifest) -> tuple[str, ...]:
    """Hints when an index kept by incremental adds no longer fits the set's size."""
    notes = []
    if m.request.kind is None and m.params.kind == "flat" and m.n_vectors >= EXACT_BELOW:
        notes.append(f"the set now has {m.n_vectors} vectors, where the default is an IVF index; "
                     "`fs index build --rebuild` switches (flat stays exact but scans everything)")
    if m.params.nlist is not None:
        fitting = default_params(m.n_vectors, m.dim, m.params.kind).nlist or 0
        if fitting >= 2 * m.params.nlist and "nlist" not in dict(m.request.overrides):
            notes.append(f"the IVF quantizer has {m.params.nlist} lists, trained when the set was smaller; "
                         f"at {m.n_vectors} vectors the default is {fitting}: `fs index build --rebuild` "
                         "re-trains it")
    return tuple(notes)


class TileIndex:
    """A loaded index that matched its embedding set when loaded; reuse it for many queries."""

    def __init__(self, store: Snapshot, es: EmbeddingSet, manifest: Manifest, index: faiss.Index) -> None:
        self.store = store
        self.es = es
        self.manifest = manifest
        self.index = index

    @property
    def params(self) -> IndexParams:
        return self.manifest.params

    def vectors(self, tile_ids: np.ndarray) -> np.ndarray:
        """Unit vectors of tiles, read from the store (the authority; PQ codes are approximations)."""
        return normalize(first_view(self.store.read_by_tile_ids(self.es, tile_ids)))

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None, *,
               exact_max: int = EXACT_FILTER_MAX) -> tuple[np.ndarray, np.ndarray]:
        """(cosine scores, tile ids) of the top ``k`` for one query vector, best first.

        ``allowed`` restricts the candidates. A small allowed set is scored exactly; a larger one
        goes through a FAISS ID selector, and falls back to exact scoring if the approximate
        search reaches fewer than k allowed tiles. A flat index is exact either way.
        """
        q = normalize(np.asarray(query).reshape(1, -1))
        if allowed is not None:
            allowed = np.unique(np.asarray(allowed, np.int64))
            if len(allowed) == 0 or (self.params.kind != "flat" and len(allowed) <= exact_max):
                return self._exact(q, k, allowed)
        scores, ids = _faiss.search(self.index, self.params, q, k * (self.params.rerank or 1), allowed)
        found = ids[0] >= 0
        scores, ids = scores[0][found], ids[0][found]
        if allowed is not None and len(ids) < min(k, len(allowed)):
            return self._exact(q, k, allowed)
        if self.params.rerank:
            return self._exact(q, k, ids)
        return scores[:k], ids[:k]

    def _exact(self, q: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(ids) == 0:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        scores = self.vectors(ids) @ q[0]
        order = np.argsort(-scores, kind="stable")[:k]
        return scores[order], ids[order]

    def pooled(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Slide ids, their pooled unit vectors (n_slides, dim) and tile counts, for this index's bags."""
        rows = self.store.sql(f"SELECT * FROM {POOLED_TABLE} WHERE set_id = ?", [self.es.id])
        versions = {(b.slide_id, b.commit_id) for b in self.manifest.bags}
        found = {(r["slide_id"], r["bag_commit_id"]): r for r in rows.to_pylist()
                 if (r["slide_id"], r["bag_commit_id"]) in versions}
        if len(found) != len(versions):
            raise StaleIndexError(f"{self.store.root}: pooled slide vectors of {self.es.encoder_name} are "
                                  f"missing for {len(versions) - len(found)} slides; run `fs index build "
                                  f"--model {self.es.encoder_name} --rebuild`")
        ordered = [found[(b.slide_id, b.commit_id)] for b in self.manifest.bags]
        return ([r["slide_id"] for r in ordered], np.array([r["embedding"] for r in ordered], np.float32),
                np.array([r["n_tiles"] for r in ordered], np.int64))


def load_index(store: Store | Snapshot, model: str) -> TileIndex:
    """The set's index, refusing to return one that no longer matches the set (``StaleIndexError``)."""
    store = store.snapshot() if isinstance(store, Store) else store
    es = store.embedding_set(model)
    directory = index_dir(store.root, es.id)
    for _ in range(2):
        manifest = read_manifest(directory)
        if manifest is None:
            raise IndexMissingError(f"{store.root}: no index for {es.encoder_name} (set {es.id}); "
                                    f"build it with `fs index build --model {model}`")
        status = diff(manifest.bags, current_bags(store, es))
        if not status.fresh:
            how = "adds only the new slides" if status.extendable else "rebuilds it"
            raise StaleIndexError(f"{directory / MANIFEST}: the index of {es.encoder_name} is stale "
                                  f"({status.describe()}); run `fs index build --model {model}` ({how})")
        path = directory / manifest.index_file
        if path.is_file():
            try:
                return TileIndex(store, es, manifest, faiss.read_index(str(path)))
            except RuntimeError as err:
                raise StaleIndexError(f"{path}: unreadable index file ({str(err).splitlines()[0]}); rebuild it "
                                      f"with `fs index build --model {model} --rebuild`") from err
        if read_manifest(directory) == manifest:
            raise StaleIndexError(f"{path}: the index file is missing; rebuild it with "
                                  f"`fs index build --model {model} --rebuild`")
    raise IndexMissingError(f"{path}: index file vanished twice while loading (a build is replacing it); "
                            "retry when `fs index build` has finished")
