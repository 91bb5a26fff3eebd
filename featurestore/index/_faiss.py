"""FAISS on unit vectors: index kinds, size-based defaults, GPU builds, filtered search.

Every index holds L2-normalised vectors under inner product, so a score is a cosine
similarity, and every vector carries the store's int64 ``tile_id`` as its FAISS id
(IVF indexes store ids natively; flat and HNSW are wrapped in ``IndexIDMap``).
This module works on numpy arrays only; ``build`` and ``search`` connect it to a store.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from featurestore.index._errors import IndexBuildError, IndexConfigError
from featurestore.index._kinds import KINDS, IndexKind, default_kind

MIN_POINTS_PER_CENTROID = 39
"""FAISS warns when k-means gets fewer training points per centroid; nlist and PQ bits stay under it."""

TRAIN_POINTS_PER_LIST = 50
"""An IVF quantizer is trained on a sample of 50 vectors per list (k-means cost grows with the sample)."""

TRAIN_ITERATIONS = 10
"""k-means iterations of IVF and PQ quantizers (FAISS's default is 25): recall@10 does not change past ~10
on clustered embeddings, and training dominates the build time."""

_USES: dict[str, tuple[str, ...]] = {
    "nlist": ("ivf", "ivf-pq"), "nprobe": ("ivf", "ivf-pq"), "pq_m": ("ivf-pq",), "pq_bits": ("ivf-pq",),
    "rerank": ("ivf-pq",), "hnsw_m": ("hnsw",), "ef_construction": ("hnsw",), "ef_search": ("hnsw",),
}
"""Which kinds each parameter applies to; an override for another kind is refused, never ignored."""


@dataclass(frozen=True)
class IndexParams:
    """How an index is laid out and searched; parameters a kind does not use are None.

    Defaults (``default_params``) for n vectors of dimension d:

    - ``nlist`` = 4·√n inverted lists, at most n/39 so k-means has enough points per list;
    - ``nprobe`` = max(32, nlist/32) lists scanned per query: ≥ 0.99 recall@10 on clustered embeddings,
      while a query reads ~3% of the index (raise it for diffuse data, lower it for speed);
    - ``pq_m`` = d/16 sub-quantizers of ``pq_bits`` = 8 bits: d/16 bytes per vector (1/64 of float32);
    - ``rerank`` = 10: an IVF-PQ search fetches 10·k candidates by their codes and re-scores them exactly
      from the store, so scores are true cosines and recall@10 matches IVF-Flat's (codes alone: ~0.3 at
      d/16 bytes on clustered data; 4·k candidates: ~0.75);
    - ``hnsw_m`` = 32 links per node, ``ef_construction`` = 80, ``ef_search`` = 128.
    """

    kind: IndexKind
    nlist: int | None = None
    nprobe: int | None = None
    pq_m: int | None = None
    pq_bits: int | None = None
    rerank: int | None = None
    hnsw_m: int | None = None
    ef_construction: int | None = None
    ef_search: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise IndexConfigError(f"index kind {self.kind!r} is unknown; choose one of {', '.join(KINDS)}")
        for name, kinds in _USES.items():
            value = getattr(self, name)
            option = "--" + name.replace("_", "-")
            if value is not None and self.kind not in kinds:
                raise IndexConfigError(f"{option} applies to {' and '.join(kinds)} indexes, not {self.kind}; "
                                       f"drop it or choose --kind {kinds[0]}")
            if value is not None and value < 1:
                raise IndexConfigError(f"{option} must be >= 1, got {value}")
        if self.nlist is not None and self.nprobe is not None and self.nprobe > self.nlist:
            raise IndexConfigError(f"--nprobe {self.nprobe} exceeds --nlist {self.nlist}; "
                                   f"use at most {self.nlist} (all lists: an exact scan)")
        if self.pq_bits is not None and self.pq_bits > 16:
            raise IndexConfigError(f"--pq-bits must be <= 16, got {self.pq_bits}; 8 is the usual choice")

    def factory(self) -> str:
        """The FAISS ``index_factory`` string of this layout (``np``: no polysemous training, which only
        serves Hamming pre-filtering, unused here, and dominates IVF-PQ build time)."""
        return {"flat": "IDMap,Flat", "ivf": f"IVF{self.nlist},Flat",
                "ivf-pq": f"IVF{self.nlist},PQ{self.pq_m}x{self.pq_bits}np",
                "hnsw": f"IDMap,HNSW{self.hnsw_m}"}[self.kind]

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexParams:
        return cls(**data)


def _pq_m(dim: int) -> int:
    """The largest divisor of ``dim`` not above dim/16 (FAISS needs sub-vectors of equal length)."""
    target = max(1, dim // 16)
    return next(m for m in range(target, 0, -1) if dim % m == 0)


def default_params(n: int, dim: int, kind: str | None = None, **overrides: int | None) -> IndexParams:
    """Parameters for ``n`` vectors of ``dim``: the kind by size unless given, then documented defaults.

    ``overrides`` (``nlist=...``, ``nprobe=...``) replace single defaults; None means "default".
    """
    unknown = set(overrides) - set(_USES)
    if unknown:
        raise IndexConfigError(f"unknown index parameter(s) {sorted(unknown)}; valid: {sorted(_USES)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    kind = kind or default_kind(n)
    values: dict[str, int] = {}
    if kind in ("ivf", "ivf-pq"):
        nlist = given.get("nlist") or max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_CENTROID))
        values |= {"nlist": nlist, "nprobe": min(nlist, max(32, nlist // 32))}
    if kind == "ivf-pq":
        bits = max(1, min(8, int(math.log2(max(n / MIN_POINTS_PER_CENTROID, 2)))))
        values |= {"pq_m": _pq_m(dim), "pq_bits": bits, "rerank": 10}
    if kind == "hnsw":
        values |= {"hnsw_m": 32, "ef_construction": 80, "ef_search": 128}
    params = IndexParams(kind, **(values | given))  # type: ignore[arg-type]
    if params.pq_m is not None and dim % params.pq_m:
        raise IndexConfigError(f"--pq-m {params.pq_m} does not divide the embedding dimension {dim}; "
                               f"choose a divisor such as {_pq_m(dim)}")
    return params


def new_index(params: IndexParams, dim: int) -> faiss.Index:
    index = faiss.index_factory(dim, params.factory(), faiss.METRIC_INNER_PRODUCT)
    if params.kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efConstruction = params.ef_construction
    if needs_training(params):
        faiss.extract_index_ivf(index).cp.niter = TRAIN_ITERATIONS
    if params.kind == "ivf-pq":
        faiss.downcast_index(index).pq.cp.niter = TRAIN_ITERATIONS
    return index


def needs_training(params: IndexParams) -> bool:
    return params.kind in ("ivf", "ivf-pq")


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Float32 unit rows (a copy); all-zero rows stay zero."""
    out = np.ascontiguousarray(vectors, dtype=np.float32).copy()
    faiss.normalize_L2(out)
    return out


# --- GPU ---------------------------------------------------------------------------------------

_GPU_RESOURCES: list = []
"""One ``StandardGpuResources`` per process, created on first use and kept (it owns scratch memory)."""


def gpu_available() -> bool:
    """True when this FAISS build has GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_gpu(gpu: bool | None) -> bool:
    """None: use a GPU when present; True: require one; False: CPU."""
    if gpu and not gpu_available():
        build = "has no GPU support (install the gpu extra)" if not hasattr(faiss, "StandardGpuResources") \
            else "sees no GPU"
        raise IndexBuildError(f"--gpu: this FAISS build {build}; drop --gpu to build on the CPU")
    return gpu_available() if gpu is None else gpu


def on_device(index: faiss.Index, gpu: bool) -> tuple[faiss.Index, str]:
    """The index to train and fill, and where it lives: a GPU clone for IVF kinds when asked.

    Flat adds are a memory copy and FAISS has no GPU HNSW build, so those stay on the CPU. A
    layout the GPU cannot hold (e.g. a PQ size without GPU kernels) falls back to the CPU.
    """
    if not gpu or not isinstance(index, faiss.IndexIVF):
        return index, "cpu"
    if not _GPU_RESOURCES:
        _GPU_RESOURCES.append(faiss.StandardGpuResources())
    try:
        return faiss.index_cpu_to_gpu(_GPU_RESOURCES[0], 0, index), "gpu"
    except RuntimeError as err:
        return index, f"cpu (GPU refused this layout: {str(err).splitlines()[0]})"


def to_cpu(index: faiss.Index) -> faiss.Index:
    return faiss.index_gpu_to_cpu(index) if type(index).__name__.startswith("Gpu") else index


# --- search ------------------------------------------------------------------------------------


def search(index: faiss.Index, params: IndexParams, queries: np.ndarray, k: int,
           allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (nq, k), best first; ``allowed`` restricts results to those ids.

    Missing results (fewer than k vectors reachable) have id -1. The restriction is a FAISS
    ``IDSelectorBatch`` checked while scanning, so a flat index returns the exact filtered top-k.
    """
    selector = None if allowed is None else faiss.IDSelectorBatch(np.ascontiguousarray(allowed, np.int64))
    if params.kind in ("ivf", "ivf-pq"):
        sp = faiss.SearchParametersIVF(sel=selector, nprobe=params.nprobe)
    elif params.kind == "hnsw":
        sp = faiss.SearchParametersHNSW(sel=selector, efSearch=max(params.ef_search, k))
    else:
        sp = faiss.SearchParameters(sel=selector)
    scores, ids = index.search(np.ascontiguousarray(queries, np.float32), k, params=sp)
    return scores, ids
