"""Soak: a real server under mixed traffic and live task swaps; errors, latency and memory.

Starts `python -m server` as a subprocess on loopback with the tiny backbone and a few tasks
(each alternates between the LPI and the dense artifact of one source task), then for
`--duration` seconds:

- `--concurrency` closed-loop workers (the `clients.load` driver, as the load script's) send a
  weighted mix of /embed (texts, sometimes an image), /search (a text query, sometimes
  filtered) and /index (a few text items whose ids are drawn from `--id-space` per task, so
  the store stops growing once every id has been written);
- a swapper PUTs the other version of the next task (round robin, with promote) every
  `--swap-interval` seconds and times it;
- the server's resident memory is sampled each second: RSS (psutil, else VmRSS in
  /proc/<pid>/status) and, where /proc has it, RssAnon, the heap and arena part a leak grows
  (RSS also counts mapped library pages, which the kernel may reclaim at any time: on a busy
  machine RSS can fall by tens of MiB while nothing was freed).

The traffic is in soak_traffic.py, the memory sampling in soak_memory.py; the server process
is `server.testing.ServerProcess`.

It reports requests, errors (by op and HTTP status, or client-side kind) and p50/p95/p99 per op,
swaps done and their p50/p95, and memory after the warm-up (`--warmup` s) against the end.
An /embed answer whose prompt version is not one its task was given counts as error "version".
Without `--backbone/--inbox` it first builds the tiny bundle (synthetic data, one epoch of LPI
and dense training, export) in a temp folder, as tests/conftest.py does. Exit status 1 if any
answer was a 5xx, a swap failed or an answer was wrong.

    python benchmarks/soak.py --help
    python benchmarks/soak.py --duration 120 --swap-interval 1.0
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import importlib.util
import logging
import os
import platform
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from benchkit import table, write_json
from soak_memory import MEMORY, MemorySampler, growth
from soak_traffic import INDEX_ITEMS, OPS, Traffic, drive, load_tasks

from clients.load import Sample, Swap
from server.testing import ServerProcess

log = logging.getLogger("benchmarks.soak")

START_TIMEOUT_S = 180.0  # torch and qdrant imports are slow on a busy machine
MAX_DURATION_S = 24 * 3600.0
OP_COLUMNS = [
    ("op", "{}"),
    ("requests", "{:d}"),
    ("errors", "{:d}"),
    ("per_s", "{:.1f}"),
    ("p50_ms", "{:.1f}"),
    ("p95_ms", "{:.1f}"),
    ("p99_ms", "{:.1f}"),
]
MEMORY_COLUMNS = [
    ("memory", "{}"),
    ("warm_mib", "{:.1f}"),
    ("end_mib", "{:.1f}"),
    ("peak_mib", "{:.1f}"),
    ("growth_mib", "{:+.1f}"),
    ("growth_pct", "{:+.2f}"),
]


@dataclass(frozen=True)
class SoakConfig:
    backbone: Path | None  # None until the tiny bundle is built
    inbox: Path | None  # holds lpi/*.safetensors and dense/*.safetensors of the same tasks
    duration_s: float = 120.0
    swap_interval_s: float = 1.0
    warmup_s: float = 20.0
    concurrency: int = 8
    tasks: int = 3
    store: str = "local"
    id_space: int = 200
    server_threads: int = 1
    promote: bool = True
    seed: int = 0
    out: Path | None = Path("benchmarks/results/soak.json")

    def check(self) -> SoakConfig:
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise ValueError(f"duration must lie in (0, {MAX_DURATION_S:.0f}] s: a soak ends")
        if not 0 <= self.warmup_s < self.duration_s:
            raise ValueError("warmup must lie in [0, duration)")
        if self.swap_interval_s <= 0 or self.concurrency < 1 or self.tasks < 1:
            raise ValueError("swap interval, concurrency and tasks must be positive")
        if self.id_space < INDEX_ITEMS:
            raise ValueError(f"id space must hold at least {INDEX_ITEMS} ids")
        return self


# -- the tiny bundle and the server process -----------------------------------------------------


def build_bundle(root: Path) -> tuple[Path, Path]:
    """The tiny backbone and artifacts, as tests/conftest.py `tiny_runs` (export.bundle's
    default recipe with an LPI and a dense run); (backbone, inbox with lpi/ and dense/)."""
    from export.bundle import BundleRecipe
    from export.bundle import build_bundle as build

    bundle = build(BundleRecipe(methods=("lpi", "dense")), root)
    return bundle.backbone, root / "artifacts"


def start_server(config: SoakConfig, data_dir: Path, log_file: Path) -> ServerProcess:
    """The server on the soak's store and threads, ready (its /readyz answers 200)."""
    args = [
        "--backbone",
        str(config.backbone),
        "--data-dir",
        str(data_dir),
        "--artifact-dir",
        str(config.inbox),
        "--store",
        config.store,
        "--threads",
        str(config.server_threads),
        "--log-level",
        "warning",
    ]
    return ServerProcess(args, log_path=log_file, start_timeout_s=START_TIMEOUT_S).start()


# -- the run ------------------------------------------------------------------------------------


def run_soak(config: SoakConfig) -> dict:
    """Start the server, drive it, stop it; the report (also written to `config.out`)."""
    config.check()
    if config.backbone is None or config.inbox is None:
        raise ValueError("run_soak needs a backbone and an inbox (see build_bundle)")
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lpi-soak-") as root:
        log_file = Path(root) / "server.log"
        server = start_server(config, Path(root) / "data", log_file)
        sampler = MemorySampler(server.pid)
        try:
            versions = asyncio.run(load_tasks(server.url, config))
            sampler.start()  # its clock starts with the traffic, near enough
            traffic = asyncio.run(drive(server.url, config, versions))
        finally:
            samples = sampler.stop()
            exit_code = server.stop()  # -15: a clean SIGTERM stop; -9: it had to be killed
        server_log = log_file.read_text(errors="replace").splitlines()
    report = summarise(config, traffic, samples)
    report["server"] = {
        "exit_code": exit_code,
        "log_errors": [line for line in server_log if "ERROR" in line or "Traceback" in line][:20],
    }
    report["environment"] = environment(load_start)
    if config.out is not None:
        write_json(config.out, report)
        log.info("wrote %s", config.out)
    return report


def summarise(config: SoakConfig, traffic: Traffic, samples: list[tuple[float, dict]]) -> dict:
    ops = {op: _op_summary([r for r in traffic.records if r.op == op], config) for op in OPS}
    errors = Counter(
        f"{r.op}:{r.status or 'no-answer'}:{error_kind(r)}" for r in traffic.records if r.error
    )
    failed_swaps = [r for r in traffic.swaps if r.error]
    swap_ms = [r.latency_ms for r in traffic.swaps if not r.error]
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "ops": ops,
        "errors": dict(sorted(errors.items())),
        "five_xx": sum(1 for r in traffic.records + traffic.swaps if (r.status or 0) >= 500),
        "wrong_answers": sum(1 for r in traffic.records if r.error == "version"),
        "swaps": {
            "done": len(swap_ms),
            "failed": len(failed_swaps),
            "failures": [f"{r.status}:{error_kind(r)}" for r in failed_swaps][:20],
            "p50_ms": _percentile(swap_ms, 50),
            "p95_ms": _percentile(swap_ms, 95),
            "max_ms": max(swap_ms, default=None),
        },
        "memory": {
            name: growth([(t, m[name]) for t, m in samples if m[name] is not None], config.warmup_s)
            for name in MEMORY
        },
        "memory_samples": [[round(t, 2), *(_round(m[n]) for n in MEMORY)] for t, m in samples],
        "windows": windows(traffic.records, samples, config.duration_s),
    }


def error_kind(record: Sample | Swap) -> str:
    """The error without its HTTP status ('503 queue_full' -> 'queue_full'; a body-less 503
    -> 'http'); client-side kinds ('timeout ReadTimeout') and checks ('version') as they are."""
    if record.status is None or record.status == 200:
        return record.error
    return record.error.removeprefix(str(record.status)).strip() or "http"


def _op_summary(records: list[Sample], config: SoakConfig) -> dict:
    ok = [r.latency_ms for r in records if r.error is None]
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "per_s": len(records) / config.duration_s,
        **{f"p{q}_ms": _percentile(ok, q) for q in (50, 95, 99)},
    }


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(values, q))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def windows(records: list[Sample], samples, duration_s: float, width: float = 10.0) -> list:
    """Per `width`-second window: requests, p50 and p99 over every op, memory at its end."""
    out = []
    for start in np.arange(0.0, duration_s, width):
        inside = [
            r.latency_ms for r in records if start <= r.start < start + width and r.error is None
        ]
        memory = [m for t, m in samples if t < start + width]
        out.append(
            {
                "t": float(start),
                "requests": len(inside),
                "p50_ms": _percentile(inside, 50),
                "p99_ms": _percentile(inside, 99),
                **{f"{n}_mib": memory[-1][n] if memory else None for n in MEMORY},
            }
        )
    return out


def environment(load_start: tuple[float, float, float]) -> dict:
    return {
        "machine": platform.node(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": importlib.metadata.version("torch"),
        "qdrant_client": importlib.metadata.version("qdrant-client"),
        "rss_source": "psutil" if importlib.util.find_spec("psutil") else "/proc/<pid>/status",
        "rss_anon_source": "/proc/<pid>/status RssAnon",
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
    }


def print_report(report: dict) -> None:
    swaps = report["swaps"]
    rows = [{"op": op, **report["ops"][op]} for op in OPS]
    rows.append(
        {
            "op": "swap",
            "requests": swaps["done"] + swaps["failed"],
            "errors": swaps["failed"],
            "per_s": None,
            "p50_ms": swaps["p50_ms"],
            "p95_ms": swaps["p95_ms"],
            "p99_ms": None,
        }
    )
    print(table(OP_COLUMNS, rows))
    print()
    memory = [{"memory": name, **report["memory"][name]} for name in MEMORY]
    print(table(MEMORY_COLUMNS, memory))
    print()
    errors = report["errors"] or "none"
    print(
        f"5xx: {report['five_xx']}  wrong versions: {report['wrong_answers']}  "
        f"errors: {errors}  server exit: {report['server']['exit_code']}"
    )
    if report["server"]["log_errors"]:
        print("server log errors:", *report["server"]["log_errors"], sep="\n  ")


def passed(report: dict) -> bool:
    return (
        report["five_xx"] == 0 and report["swaps"]["failed"] == 0 and report["wrong_answers"] == 0
    )


def parse_args(argv: list[str] | None = None) -> SoakConfig:
    """The run's settings; backbone and inbox stay None when the tiny bundle is to be built."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of traffic")
    parser.add_argument("--swap-interval", type=float, default=1.0, help="seconds between swaps")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds before memory counts")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop workers")
    parser.add_argument("--tasks", type=int, default=3, help="tasks loaded and swapped")
    parser.add_argument("--store", default="local", help="the server's --store")
    parser.add_argument("--id-space", type=int, default=200, help="distinct /index ids per task")
    parser.add_argument("--server-threads", type=int, default=1, help="the server's --threads")
    parser.add_argument(
        "--promote",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="swaps also make the new version the searched one",
    )
    parser.add_argument("--backbone", type=Path, help="a backbone checkpoint (with --inbox)")
    parser.add_argument("--inbox", type=Path, help="folder with lpi/ and dense/ artifacts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak.json"))
    args = parser.parse_args(argv)
    if (args.backbone is None) != (args.inbox is None):
        parser.error("give both --backbone and --inbox, or neither (the tiny bundle is built)")
    config = SoakConfig(
        backbone=args.backbone,
        inbox=args.inbox,
        duration_s=args.duration,
        swap_interval_s=args.swap_interval,
        warmup_s=args.warmup,
        concurrency=args.concurrency,
        tasks=args.tasks,
        store=args.store,
        id_space=args.id_space,
        server_threads=args.server_threads,
        promote=args.promote,
        seed=args.seed,
        out=args.out,
    )
    try:
        return config.check()  # before a bundle is built for nothing
    except ValueError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    config = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lpi-soak-bundle-") as root:
        if config.backbone is None:
            log.info("building the tiny bundle in %s", root)
            backbone, inbox = build_bundle(Path(root))
            config = dataclasses.replace(config, backbone=backbone, inbox=inbox)
        report = run_soak(config)
    print_report(report)
    return 0 if passed(report) else 1


if __name__ == "__main__":
    raise SystemExit(main())
