"""Retrieval: FAISS flat / IVF / IVF-PQ / HNSW against exact brute force in numpy and in DuckDB.

    python -m benchmarks.bench_retrieval [--quick]

Data are clustered unit vectors (like tissue-type clusters of tile embeddings); queries are held-out
points of the same distribution, and the truth is the exact inner-product top-10. Every FAISS index
is built with the defaults ``fs index build`` would choose for its kind (``default_params``).

Two query modes, reported side by side:

- one at a time, as ``fs search`` runs: numpy is a matrix-vector product, DuckDB one
  ``ORDER BY array_cosine_similarity(v, q) DESC LIMIT 10`` statement per query (as ``fs sql`` would);
- batched (numpy, FAISS): all queries in one call, as an API user mining neighbours would.

IVF-PQ is shown from its codes alone and with the exact re-scoring ``fs search`` applies (here from
the vectors in memory; the store reads them from Zarr, which adds a few ms per query).

Ratios are queries/s over numpy's and DuckDB's, one query at a time.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import duckdb
import numpy as np
import pyarrow as pa

from benchmarks._common import row
from featurestore.index import _faiss
from featurestore.index._faiss import TRAIN_POINTS_PER_LIST, default_params

KINDS = ("flat", "ivf", "ivf-pq", "hnsw")
FULL = [(100_000, 1024, KINDS), (1_000_000, 1024, ("flat",))]
"""At 1M x 1024 only exact search runs: on a 2-core machine the IVF k-means (200k points x 4,000
centroids x 10 iterations, about 16 TFLOP, twice) and the HNSW build take well over the 15 minutes a
benchmark may run. On a bigger machine, add the kinds back here."""
QUICK = [(20_000, 256, KINDS), (100_000, 256, KINDS)]
QUERIES = 200
K = 10


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around n/100 random centres, with within-cluster spread comparable to the centres'."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 100), dim), dtype=np.float32)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        noise = rng.standard_normal((m, dim), dtype=np.float32)
        out[start:start + m] = centres[rng.integers(0, len(centres), m)] + noise
    return _faiss.normalize(out)


def _recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(t)) / K for g, t in zip(got, truth, strict=True)]))


def _rate(fn: Callable[[np.ndarray], np.ndarray], queries: np.ndarray,
          budget_s: float = 5.0) -> tuple[float, list]:
    """Queries/s one at a time (stopping after ``budget_s``), and the answers."""
    answers = []
    t0 = time.perf_counter()
    for q in queries:
        answers.append(fn(q))
        if time.perf_counter() - t0 > budget_s:
            break
    return len(answers) / (time.perf_counter() - t0), answers


def _numpy(vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict:
    single, _ = _rate(lambda q: np.argpartition(-(vectors @ q), K)[:K], queries)
    t0 = time.perf_counter()
    np.argpartition(-(queries @ vectors.T), K, axis=1)[:, :K]
    return {"method": "numpy (exact)", "build_s": 0.0, "qps": single,
            "batch_qps": len(queries) / (time.perf_counter() - t0), "recall@10": 1.0}


def _duckdb(vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict:
    n, dim = vectors.shape
    con = duckdb.connect(":memory:")
    t0 = time.perf_counter()
    table = pa.table({"id": np.arange(n, dtype=np.int64),
                      "v": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim)})
    con.register("src", table)
    con.execute("CREATE TABLE t AS SELECT * FROM src")
    build = time.perf_counter() - t0
    sql = f"SELECT id FROM t ORDER BY array_cosine_similarity(v, $q::FLOAT[{dim}]) DESC LIMIT {K}"
    single, answers = _rate(lambda q: con.execute(sql, {"q": q.tolist()}).fetchnumpy()["id"], queries)
    con.close()
    return {"method": "duckdb array_cosine_similarity", "build_s": build, "qps": single, "batch_qps": None,
            "recall@10": _recall(np.array(answers), truth[:len(answers)])}


def _faiss_kind(kind: str, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> list[dict]:
    n, dim = vectors.shape
    params = default_params(n, dim, kind)
    t0 = time.perf_counter()
    index = _faiss.new_index(params, dim)
    if _faiss.needs_training(params):
        size = min(n, params.nlist * TRAIN_POINTS_PER_LIST)
        index.train(vectors[np.sort(np.random.default_rng(0).choice(n, size, replace=False))])
    index.add_with_ids(vectors, np.arange(n, dtype=np.int64))
    build = time.perf_counter() - t0
    layout = ", ".join(f"{k}={v}" for k, v in params.to_dict().items() if k not in ("kind", "rerank"))
    name = f"faiss {kind}" + (f" ({layout})" if layout else "")
    rows = [_timed(name, build, lambda q: _faiss.search(index, params, q, K)[1], queries, truth)]
    if params.rerank:
        def reranked(q: np.ndarray) -> np.ndarray:
            candidates = _faiss.search(index, params, q, K * params.rerank)[1]
            out = np.empty((len(q), K), np.int64)
            for i, c in enumerate(candidates):
                c = c[c >= 0]
                out[i] = c[np.argsort(-(vectors[c] @ q[i]))[:K]]
            return out

        rows[0]["method"] += ", codes only"
        name = f"faiss {kind} + exact re-score of {params.rerank}·k"
        rows.append(_timed(name, build, reranked, queries, truth))
    return rows


def _timed(method: str, build: float, search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray,
           truth: np.ndarray) -> dict:
    """Time ``search`` (a batch of queries → (nq, K) ids) one query at a time and batched."""
    single, _ = _rate(lambda q: search(q[None])[0], queries)
    t0 = time.perf_counter()
    got = search(queries)
    batch = len(queries) / (time.perf_counter() - t0)
    return {"method": method, "build_s": build, "qps": single, "batch_qps": batch,
            "recall@10": _recall(got, truth)}


def measure(quick: bool) -> list[dict]:
    """One row per (size, method): build seconds, queries/s (single and batched), recall@10, ratios."""
    rows = []
    for n, dim, kinds in QUICK if quick else FULL:
        data = clustered(n + QUERIES, dim)
        queries, vectors = data[:QUERIES], data[QUERIES:]
        truth = np.argpartition(-(queries @ vectors.T), K, axis=1)[:, :K]
        results = [_numpy(vectors, queries, truth), _duckdb(vectors, queries, truth)]
        for kind in kinds:
            results += _faiss_kind(kind, vectors, queries, truth)
        base_numpy, base_duckdb = results[0]["qps"], results[1]["qps"]
        for r in results:
            rows.append({"n": n, "dim": dim, **r, "x_numpy": r["qps"] / base_numpy,
                         "x_duckdb": r["qps"] / base_duckdb})
    return rows


def run(quick: bool) -> list[dict]:
    """``measure`` in the benchmark runner's row format (``python -m benchmarks``)."""
    return [row("retrieval", f"{r['n']:,} x {r['dim']}: {r['method']}", r["qps"], "q/s", ratio=r["x_numpy"],
                vs="numpy exact, one query at a time",
                note=f"recall@10 {r['recall@10']:.3f}; x duckdb {r['x_duckdb']:.1f}; build {r['build_s']:.1f} s")
            for r in measure(quick)]


def print_table(rows: list[dict]) -> None:
    head = (f"{'n':>9} {'dim':>5}  {'method':<64} {'build s':>8} {'q/s':>9} {'batch q/s':>10} "
            f"{'recall@10':>9} {'×numpy':>8} {'×duckdb':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        batch = f"{r['batch_qps']:10.0f}" if r["batch_qps"] is not None else f"{'-':>10}"
        print(f"{r['n']:>9} {r['dim']:>5}  {r['method']:<64} {r['build_s']:8.1f} {r['qps']:9.1f} {batch} "
              f"{r['recall@10']:9.3f} {r['x_numpy']:8.1f} {r['x_duckdb']:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes up to 100k x 256 instead of 1M x 1024")
    print_table(measure(parser.parse_args().quick))


if __name__ == "__main__":
    main()
