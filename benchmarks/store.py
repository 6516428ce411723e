"""Vector store speed: upsert throughput and search latency, embedded backends side by side.

For each size (points of one task version, vectors of size D) and backend, in a fresh data
directory: upsert in batches, then time single-vector searches (top 10; and with a payload
filter on an unindexed key matching a third of the points). Data: `clustered` (default) draws
points around 64 random centres and queries near stored points, as embeddings of a real corpus
have neighbours; `gaussian` draws both from one isotropic Gaussian, the worst case for HNSW,
where the nearest neighbours are barely nearer than the rest. Backends:

- local: qdrant-client's local mode in a directory (the default store; brute force in numpy,
  one SQLite commit per point);
- local-memory: the same in memory (no commits: the cost of the engine alone);
- edge: qdrant-edge-py, the Qdrant engine in-process, before any index is built (exact);
- edge-hnsw: the same after `optimize()` built HNSW graphs (approximate: recall@10 against
  exact search is reported, and the build time).

    python benchmarks/store.py --help
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from benchkit import table, write_json

from server.store import QdrantStore, VectorStore

log = logging.getLogger("benchmarks.store")

TASK, VERSION, TOP_K = "bench", "v1", 10
BACKENDS = ["local", "local-memory", "edge", "edge-hnsw"]
COLUMNS = [
    ("backend", "{}"),
    ("points", "{:d}"),
    ("upsert_pts_per_s", "{:.0f}"),
    ("index_s", "{:.1f}"),
    ("search_p50_ms", "{:.2f}"),
    ("search_p99_ms", "{:.2f}"),
    ("filtered_p50_ms", "{:.2f}"),
    ("recall_at_10", "{:.3f}"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/store.json"), help="JSON results"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--dim", type=int, default=512, help="vector size D")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, help="default: local, edge*")
    parser.add_argument("--batch", type=int, default=256, help="points per upsert call")
    parser.add_argument("--queries", type=int, default=200, help="timed searches per setting")
    parser.add_argument(
        "--filtered-queries", type=int, default=50, help="timed filtered searches (slow locally)"
    )
    parser.add_argument("--threads", type=int, default=1, help="edge search/index threads")
    parser.add_argument("--data", choices=["clustered", "gaussian"], default="clustered")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.backends is None:
        args.backends = ["local", "edge", "edge-hnsw"] if has_edge() else ["local"]
    return args


def has_edge() -> bool:
    return importlib.util.find_spec("qdrant_edge") is not None


def open_backend(backend: str, path: Path, threads: int) -> VectorStore:
    if backend == "local":
        return QdrantStore(path)
    if backend == "local-memory":
        return QdrantStore(location=":memory:")
    from server.store import EdgeStore

    return EdgeStore(path, search_threads=threads, index_threads=threads)


def latencies_ms(search: Callable[[np.ndarray], object], queries: np.ndarray) -> list[float]:
    search(queries[0])  # warm-up
    out = []
    for query in queries:
        start = time.perf_counter()
        search(query)
        out.append((time.perf_counter() - start) * 1e3)
    return out


def make_data(kind: str, n: int, q: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Points [N, D] and queries [Q, D], float32."""
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        points, queries = rng.standard_normal((n, d)), rng.standard_normal((q, d))
    else:
        centres = unit(rng.standard_normal((64, d)))
        points = unit(centres[rng.integers(64, size=n)] + unit(rng.standard_normal((n, d))))
        queries = points[rng.integers(n, size=q)] + 0.5 * unit(rng.standard_normal((q, d)))
    return points.astype(np.float32), queries.astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def exact_top(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """[Q, TOP_K] row indices of the exact cosine top-k."""
    scores = queries @ unit(vectors).T  # [Q, N]; the query's norm does not change the order
    return np.argsort(-scores, axis=1)[:, :TOP_K]


def run(backend: str, n: int, args: argparse.Namespace, root: Path) -> dict:
    vectors, queries = make_data(args.data, n, args.queries, args.dim, args.seed)  # [N, D], [Q, D]
    ids = [str(i) for i in range(n)]
    payloads = [{"group": f"g{i % 3}"} for i in range(n)]
    store = open_backend(backend, root / f"{backend}-{n}", args.threads)
    try:
        store.ensure_task(TASK, args.dim, VERSION)
        start = time.perf_counter()
        for lo in range(0, n, args.batch):
            hi = lo + args.batch
            store.upsert(TASK, VERSION, ids[lo:hi], vectors[lo:hi], payloads[lo:hi])
        upsert_s = time.perf_counter() - start
        index_s = None
        if backend == "edge-hnsw":
            start = time.perf_counter()
            store.optimize()
            index_s = time.perf_counter() - start

        def search(query, filter=None):
            return store.search(TASK, VERSION, query, top_k=TOP_K, filter=filter)

        plain = latencies_ms(search, queries)
        some = queries[: args.filtered_queries]
        filtered = latencies_ms(lambda q: search(q, {"group": "g1"}), some)
        found = [[int(hit.id) for hit in search(query)] for query in queries]
    finally:
        store.close()
    exact = exact_top(vectors, queries)
    recall = np.mean([len(set(f) & set(e)) / TOP_K for f, e in zip(found, exact, strict=True)])
    return {
        "backend": backend,
        "points": n,
        "upsert_pts_per_s": n / upsert_s,
        "index_s": index_s,
        "search_p50_ms": statistics.median(plain),
        "search_p99_ms": float(np.percentile(plain, 99)),
        "filtered_p50_ms": statistics.median(filtered),
        "recall_at_10": float(recall),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("qdrant-client", "qdrant-edge-py", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lpi-store-bench-") as root:
        for n in args.sizes:
            for backend in args.backends:
                log.info("running %s with %d points", backend, n)
                rows.append(run(backend, n, args, Path(root)))
    print(table(COLUMNS, rows))
    environment = {
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "edge_threads": args.threads,
        "data": args.data,
        "dim": args.dim,
        "batch": args.batch,
        "queries": args.queries,
        "top_k": TOP_K,
        **versions(),
    }
    write_json(args.out, {"environment": environment, "rows": rows})
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
