"""Vector store at scale: ingest rate, index build, search latency, recall@10 and memory.

For each size N (points of one task version, vectors of size D) and backend, in a fresh data
directory: upsert in batches (ingest points/s, the vectors given), then time single-vector
searches (top 10), plain and filtered (a keyword payload index on `group`, which a third of
the points match), and score recall@10 against exact top-10 computed here in numpy.

Data: `clustered` (default) draws points around 64 random centres and queries near stored
points (a stored point plus noise of half its norm), as embeddings of a real corpus have
neighbours; `gaussian` draws both from one isotropic Gaussian, the worst case for HNSW. Points
are generated chunk by chunk from the seed, so this process never holds all N vectors and its
RSS growth is the store's.

Backends and the rows each gives:

- local: qdrant-client's local mode in a directory (brute force in numpy);
- edge: qdrant-edge-py, the Qdrant engine in-process, before any index is built (exact);
- edge-default: HNSW with Qdrant's defaults (m 16, ef_construct 100, ef 100), float32;
- edge-tuned: HNSW with the store's defaults (`server.store.tuning.IndexSettings`: int8
  quantisation with rescoring), one build measured at each `--ef` with int8 and, on the same
  graph, without it (`quantized=False`); also exact search on that collection (`exact`).

Every search runs on one thread (`--threads`). RSS is this process's resident memory after
the searches minus before the store opened (anonymous memory apart from mapped files).

    python benchmarks/store.py --help
    nice python benchmarks/store.py --sizes 1000000 --backends edge-tuned edge-default
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

# Run as a script, Python puts benchmarks/ first on sys.path, where a file named like a module
# a dependency imports (tokenizer, kernel, ...) would shadow it: import from the repository
# root instead, and benchkit by its path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.benchkit import table, write_json  # noqa: E402
from server.store import QdrantStore, VectorStore  # noqa: E402
from server.store.tuning import IndexSettings, SearchOptions  # noqa: E402

log = logging.getLogger("benchmarks.store")
LOAD_AT_START = os.getloadavg()

TASK, VERSION, TOP_K, CHUNK = "bench", "v1", 10, 20_000
BACKENDS = ["local", "edge", "edge-default", "edge-tuned"]
QDRANT_DEFAULT = IndexSettings(m=16, ef_construct=100, hnsw_ef=100, quantization="none")
COLUMNS = [
    ("backend", "{}"),
    ("search", "{}"),
    ("points", "{:d}"),
    ("upsert_pts_per_s", "{:.0f}"),
    ("upsert_cpu_pts_per_s", "{:.0f}"),
    ("build_s", "{:.0f}"),
    ("build_cpu_s", "{:.0f}"),
    ("search_p50_ms", "{:.2f}"),
    ("search_p99_ms", "{:.2f}"),
    ("search_cpu_p99_ms", "{:.2f}"),
    ("filtered_p50_ms", "{:.2f}"),
    ("filtered_p99_ms", "{:.2f}"),
    ("recall_at_10", "{:.3f}"),
    ("rss_mb", "{:.0f}"),
    ("rss_anon_mb", "{:.0f}"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/store.json"), help="JSON results"
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[20_000, 200_000], help="points N per run"
    )
    parser.add_argument("--dim", type=int, default=512, help="vector size D")
    parser.add_argument(
        "--backends", nargs="+", choices=BACKENDS, help="None: local (N <= 20k) and edge*"
    )
    parser.add_argument("--batch", type=int, default=1024, help="points per upsert call")
    parser.add_argument("--queries", type=int, default=200, help="timed searches per row")
    parser.add_argument("--filtered-queries", type=int, default=100, help="timed filtered ones")
    parser.add_argument(
        "--ef", type=int, nargs="+", default=[128, 512, 1024], help="edge-tuned search ef values"
    )
    parser.add_argument("--threads", type=int, default=1, help="edge search threads")
    parser.add_argument("--index-threads", type=int, default=1, help="edge HNSW build threads")
    parser.add_argument("--on-disk", action="store_true", help="edge-tuned: vectors on disk")
    parser.add_argument(
        "--data", choices=["clustered", "gaussian"], default="clustered", help="see above"
    )
    parser.add_argument("--seed", type=int, default=0, help="of points and queries")
    parser.add_argument("--dir", type=Path, help="parent of the temporary data directory")
    return parser.parse_args(argv)


def has_edge() -> bool:
    return importlib.util.find_spec("qdrant_edge") is not None


def backends_for(args: argparse.Namespace, n: int) -> list[str]:
    if args.backends:
        return args.backends
    edge = ["edge", "edge-default", "edge-tuned"] if has_edge() else []
    return (["local"] if n <= 20_000 else []) + edge


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class Data:
    """N points [N, D] generated in chunks of CHUNK from the seed, and Q queries [Q, D]."""

    def __init__(self, kind: str, n: int, q: int, d: int, seed: int) -> None:
        self.kind, self.n, self.d, self.seed = kind, n, d, seed
        rng = np.random.default_rng(seed)
        self.centres = unit(rng.standard_normal((64, d)))
        self.sources = rng.integers(n, size=q)  # the stored point each query starts from
        noise = unit(rng.standard_normal((q, d)))
        if kind == "clustered":
            base = np.empty((q, d), dtype=np.float32)  # [Q, D], each chunk generated once
            for index in np.unique(self.sources // CHUNK):
                rows = np.flatnonzero(self.sources // CHUNK == index)
                base[rows] = self.chunk(int(index))[self.sources[rows] % CHUNK]
            noise = base + 0.5 * noise
        self.queries = noise.astype(np.float32)

    def chunk(self, index: int) -> np.ndarray:
        lo, hi = index * CHUNK, min(self.n, (index + 1) * CHUNK)
        rng = np.random.default_rng([self.seed, index])
        if self.kind == "gaussian":
            return rng.standard_normal((hi - lo, self.d)).astype(np.float32)
        centres = self.centres[rng.integers(64, size=hi - lo)]
        return unit(centres + unit(rng.standard_normal((hi - lo, self.d)))).astype(np.float32)

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        for index in range(-(-self.n // CHUNK)):
            yield index * CHUNK, self.chunk(index)

    def exact_top(self) -> np.ndarray:
        """[Q, TOP_K] indices of the exact cosine top-k, merged chunk by chunk."""
        best_s = np.full((len(self.queries), 0), -np.inf, dtype=np.float32)
        best_i = np.zeros((len(self.queries), 0), dtype=np.int64)
        for lo, chunk in self.chunks():
            scores = self.queries @ chunk.T  # [Q, C]; points are unit, queries' norm irrelevant
            ids = np.broadcast_to(np.arange(lo, lo + len(chunk)), scores.shape)
            all_s, all_i = np.hstack([best_s, scores]), np.hstack([best_i, ids])
            keep = np.argsort(-all_s, axis=1)[:, :TOP_K]
            best_s = np.take_along_axis(all_s, keep, 1)
            best_i = np.take_along_axis(all_i, keep, 1)
        return best_i


def rss_mb() -> tuple[float, float]:
    """(VmRSS, RssAnon) of this process in MB, from /proc (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return tuple(int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "RssAnon"))


def open_backend(backend: str, path: Path, args: argparse.Namespace) -> VectorStore:
    if backend == "local":
        return QdrantStore(path)
    from server.store import EdgeStore

    index = QDRANT_DEFAULT if backend in ("edge", "edge-default") else IndexSettings()
    if args.on_disk:
        index = IndexSettings(**{**index.__dict__, "on_disk": True})
    return EdgeStore(
        path, search_threads=args.threads, index_threads=args.index_threads, index=index
    )


def latencies_ms(
    search: Callable[[np.ndarray], object], queries: np.ndarray
) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU (this process's, every thread) milliseconds per search. On a machine
    shared with other jobs the wall clock includes waiting for a core; CPU time does not."""
    search(queries[0])  # warm-up
    wall, cpu = [], []
    for query in queries:
        start, start_cpu = time.perf_counter(), time.process_time()
        search(query)
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return wall, cpu


def modes(backend: str, efs: list[int]) -> list[tuple[str, SearchOptions]]:
    if backend in ("local", "edge"):
        return [("exact", SearchOptions())]
    if backend == "edge-default":
        return [("ef100", SearchOptions(hnsw_ef=100))]
    out = [("exact", SearchOptions(exact=True))]
    for ef in efs:
        out += [(f"ef{ef}-int8", SearchOptions(hnsw_ef=ef))]
        out += [(f"ef{ef}-f32", SearchOptions(hnsw_ef=ef, quantized=False))]
    return out


def ingest(store: VectorStore, data: Data, batch: int) -> tuple[float, float]:
    """Points/s into the store, the vectors given (their generation is not timed): by the wall
    clock and by this process's CPU time."""
    spent = spent_cpu = 0.0
    for lo, chunk in data.chunks():
        for start in range(0, len(chunk), batch):
            rows = chunk[start : start + batch]
            ids = [str(lo + start + i) for i in range(len(rows))]
            payloads = [{"group": f"g{(lo + start + i) % 3}"} for i in range(len(rows))]
            began, began_cpu = time.perf_counter(), time.process_time()
            store.upsert(TASK, VERSION, ids, rows, payloads)
            spent += time.perf_counter() - began
            spent_cpu += time.process_time() - began_cpu
    return data.n / spent, data.n / spent_cpu


def run(backend: str, n: int, args: argparse.Namespace, root: Path) -> list[dict]:
    data = Data(args.data, n, args.queries, args.dim, args.seed)
    before = rss_mb()
    store = open_backend(backend, root / f"{backend}-{n}", args)
    rows = []
    try:
        store.ensure_task(TASK, args.dim, VERSION)
        if backend != "local":
            store.index_field(TASK, VERSION, "group", "keyword")
        upserts, upserts_cpu = ingest(store, data, args.batch)
        build_s = build_cpu_s = None
        if backend in ("edge-default", "edge-tuned"):
            log.info("building HNSW over %d points (%s)", n, backend)
            start, start_cpu = time.perf_counter(), time.process_time()
            store.optimize()
            build_s = time.perf_counter() - start
            build_cpu_s = time.process_time() - start_cpu
        exact = data.exact_top()
        for name, options in modes(backend, args.ef):
            log.info("searching %s %d %s", backend, n, name)

            def search(query, filter=None, options=options):
                return store.search(TASK, VERSION, query, TOP_K, filter, options=options)

            plain, plain_cpu = latencies_ms(search, data.queries)
            some = data.queries[: args.filtered_queries]
            filtered, _ = latencies_ms(lambda q: search(q, {"group": "g1"}), some)
            found = [[int(hit.id) for hit in search(query)] for query in data.queries]
            pairs = zip(found, exact, strict=True)
            recall = np.mean([len(set(f) & set(e)) / TOP_K for f, e in pairs])
            rss, anon = (now - then for now, then in zip(rss_mb(), before, strict=True))
            rows.append(
                {
                    "backend": backend,
                    "search": name,
                    "points": n,
                    "upsert_pts_per_s": upserts,
                    "upsert_cpu_pts_per_s": upserts_cpu,
                    "build_s": build_s,
                    "build_cpu_s": build_cpu_s,
                    "search_p50_ms": statistics.median(plain),
                    "search_p99_ms": float(np.percentile(plain, 99)),
                    "search_cpu_p50_ms": statistics.median(plain_cpu),
                    "search_cpu_p99_ms": float(np.percentile(plain_cpu, 99)),
                    "filtered_p50_ms": statistics.median(filtered),
                    "filtered_p99_ms": float(np.percentile(filtered, 99)),
                    "recall_at_10": float(recall),
                    "rss_mb": rss,
                    "rss_anon_mb": anon,
                }
            )
            log.info("%s", rows[-1])
    finally:
        store.close()
    return rows


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for package in ("qdrant-client", "qdrant-edge-py", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def environment(args: argparse.Namespace) -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_at_start": LOAD_AT_START,
        "load_avg_at_end": os.getloadavg(),
        "search_threads": args.threads,
        "index_threads": args.index_threads,
        "on_disk": args.on_disk,
        "data": args.data,
        "dim": args.dim,
        "batch": args.batch,
        "queries": args.queries,
        "top_k": TOP_K,
        "defaults": IndexSettings().__dict__,
        **versions(),
    }


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lpi-store-bench-", dir=args.dir) as root:
        for n in args.sizes:
            for backend in backends_for(args, n):
                log.info("running %s with %d points", backend, n)
                rows += run(backend, n, args, Path(root))
                write_json(args.out, {"environment": environment(args), "rows": rows})
    print(table(COLUMNS, rows))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
