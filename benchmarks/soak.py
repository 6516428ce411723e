"""Soak: a real server under mixed traffic and live task swaps; errors, latency and memory.

Starts `python -m server` as a subprocess on loopback with the tiny backbone and a few tasks
(each alternates between the LPI and the dense artifact of one source task), then for
`--duration` seconds:

- `--concurrency` closed-loop workers send a weighted mix of /embed (texts, sometimes an image),
  /search (a text query, sometimes filtered) and /index (a few text items whose ids are drawn
  from `--id-space` per task, so the store stops growing once every id has been written);
- a swapper PUTs the other version of the next task (round robin, with promote) every
  `--swap-interval` seconds and times it;
- the server's resident memory is sampled each second: RSS (psutil, else VmRSS in
  /proc/<pid>/status) and, where /proc has it, RssAnon, the heap and arena part a leak grows
  (RSS also counts mapped library pages, which the kernel may reclaim at any time: on a busy
  machine RSS can fall by tens of MiB while nothing was freed).

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
import base64
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import io
import itertools
import json
import logging
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from benchkit import table, write_json

log = logging.getLogger("benchmarks.soak")

REPO = Path(__file__).resolve().parents[1]
OPS = ("embed", "search", "index")
WEIGHTS = {"embed": 0.5, "search": 0.3, "index": 0.2}
INDEX_ITEMS = 4  # items per /index request
START_TIMEOUT_S = 180.0  # torch and qdrant imports are slow on a busy machine
STOP_TIMEOUT_S = 20.0
REQUEST_TIMEOUT_S = 60.0
MAX_DURATION_S = 24 * 3600.0
WORDS = ("red", "green", "blue", "small", "large", "square", "circle", "star", "stripes", "dots",
         "on", "a", "grey", "white", "field")  # fmt: skip
OP_COLUMNS = [
    ("op", "{}"),
    ("requests", "{:d}"),
    ("errors", "{:d}"),
    ("per_s", "{:.1f}"),
    ("p50_ms", "{:.1f}"),
    ("p95_ms", "{:.1f}"),
    ("p99_ms", "{:.1f}"),
]
MEMORY = ("rss", "rss_anon")  # the series sampled; rss_anon is None where /proc lacks it
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
    """The tiny backbone and artifacts, as tests/conftest.py `tiny_runs`; (backbone, inbox)."""
    import lpi
    from export.tasks import export_run
    from lpi.checkpoint import save_backbone
    from lpi.continual.data import synthetic
    from lpi.train import main as train_main

    synthetic.main([
        "--out", str(root / "data"), "--tasks", "2", "--train-per-task", "24",
        "--test-per-task", "12", "--pretrain", "16", "--image-size", "32",
    ])  # fmt: skip
    backbone_file = save_backbone(lpi.load_backbone("tiny", seed=3), root / "backbone.safetensors")
    backbone = lpi.load_backbone(backbone_file)
    for method in ("lpi", "dense"):
        code = train_main([
            "--manifest", str(root / "data" / "manifest.jsonl"), "--backbone", str(backbone_file),
            "--out", str(root / method), "--method", method, "--layers", "2", "--tokens", "4",
            "--epochs", "1", "--batch-size", "8", "--cache",
        ])  # fmt: skip
        if code != 0:
            raise RuntimeError(f"training the tiny {method} run failed ({code})")
        export_run(root / method, backbone, root / "inbox" / method)
    return backbone_file, root / "inbox"


def version_pairs(inbox: Path) -> list[tuple[str, str]]:
    """(lpi/X, dense/X) paths relative to the inbox, for every X exported by both methods."""
    pairs = [
        (f"lpi/{path.name}", f"dense/{path.name}")
        for path in sorted((inbox / "lpi").glob("*.safetensors"))
        if (inbox / "dense" / path.name).is_file()
    ]
    if not pairs:
        raise FileNotFoundError(f"{inbox}: no lpi/X.safetensors with a dense/X.safetensors")
    return pairs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(
    config: SoakConfig, data_dir: Path, log_file: Path
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [
        sys.executable, "-m", "server", "--backbone", str(config.backbone),
        "--data-dir", str(data_dir), "--artifact-dir", str(config.inbox),
        "--store", config.store, "--threads", str(config.server_threads),
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: see {log_file}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop_server(proc)
    raise RuntimeError(f"the server was not ready after {START_TIMEOUT_S:.0f} s")


def stop_server(proc: subprocess.Popen) -> int:
    """SIGTERM (uvicorn drains), then SIGKILL if it does not end in time; the exit code.

    After a graceful shutdown uvicorn raises the signal it caught again, so a clean stop
    reads -15 (SIGTERM); -9 means it had to be killed.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)
    return proc.returncode


# -- memory -------------------------------------------------------------------------------------


def memory_mib(pid: int) -> dict[str, float | None]:
    """RSS and anonymous RSS of a process in MiB (anon None without /proc)."""
    status = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                status[key] = int(value.split()[0]) / 1024  # kB
    if importlib.util.find_spec("psutil") is not None:
        import psutil

        try:
            status["VmRSS"] = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error as error:
            raise OSError(str(error)) from error
    if "VmRSS" not in status:
        raise OSError(f"no RSS for process {pid}")
    return {"rss": status["VmRSS"], "rss_anon": status.get("RssAnon")}


class MemorySampler(threading.Thread):
    """(seconds since start, `memory_mib`) of a process, once per `interval`, until stopped."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, dict]] = []
        self.start_time = time.monotonic()
        self._stop_event = threading.Event()

    def run(self) -> None:
        self.start_time = time.monotonic()
        while True:
            try:
                self.samples.append((time.monotonic() - self.start_time, memory_mib(self.pid)))
            except OSError:  # the process ended
                return
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> list[tuple[float, dict]]:
        self._stop_event.set()
        if self.is_alive():
            self.join(10)
        return self.samples


# -- traffic ------------------------------------------------------------------------------------


@dataclass
class Record:
    op: str
    t: float  # seconds since the traffic started
    ms: float
    status: int | None  # None: no HTTP answer
    error: str | None = None  # the error kind (or client-side exception) when not a success
    version: str | None = None  # the prompt version the answer names


@dataclass
class Traffic:
    records: list[Record] = field(default_factory=list)
    swaps: list[Record] = field(default_factory=list)


class Inputs:
    """Synthetic captions and PNGs, made once."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self.captions = [" ".join(rng.choices(WORDS, k=rng.randint(2, 8))) for _ in range(64)]
        self.images = [_png(np.random.default_rng(seed + i)) for i in range(8)]


def _png(rng: np.random.Generator) -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def request_body(op: str, task: str, rng: random.Random, inputs: Inputs, id_space: int) -> dict:
    if op == "embed":
        body = {"task": task, "texts": rng.sample(inputs.captions, 2)}
        if rng.random() < 0.25:
            body["images"] = [rng.choice(inputs.images)]
        return body
    if op == "search":
        body = {"task": task, "query": {"text": rng.choice(inputs.captions)}, "top_k": 10}
        if rng.random() < 0.25:
            body["filter"] = {"n": rng.randrange(10)}
        return body
    ids = rng.sample(range(id_space), INDEX_ITEMS)
    items = [
        {"id": f"s{i}", "text": rng.choice(inputs.captions), "payload": {"n": i % 10}} for i in ids
    ]
    return {"task": task, "items": items}


async def drive(url: str, config: SoakConfig, versions: dict[str, dict[str, str]]) -> Traffic:
    """Workers and the swapper against `url` until the duration is up.

    `versions`: task -> prompt version -> artifact path (inbox-relative).
    """
    traffic, inputs = Traffic(), Inputs(config.seed)
    tasks = sorted(versions)
    limits = httpx.Limits(max_connections=config.concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
        active = {task: (await _task_info(http, task))["prompt_version"] for task in tasks}
        start = time.monotonic()
        deadline = start + config.duration_s

        async def worker(k: int) -> None:
            rng = random.Random(config.seed * 1000 + k)
            ops, weights = list(WEIGHTS), list(WEIGHTS.values())
            while time.monotonic() < deadline:
                op, task = rng.choices(ops, weights)[0], rng.choice(tasks)
                body = request_body(op, task, rng, inputs, config.id_space)
                record = await _send(http, "POST", f"/{op}", start, op, json=body)
                if op == "embed" and record.status == 200 and record.version not in versions[task]:
                    record.error = "version"
                traffic.records.append(record)

        async def swapper() -> None:
            for n in itertools.count():
                wake = start + (n + 1) * config.swap_interval_s
                if wake >= deadline:
                    return
                await asyncio.sleep(max(0.0, wake - time.monotonic()))
                task = tasks[n % len(tasks)]
                target = next(v for v in versions[task] if v != active[task])
                body = {"path": versions[task][target], "promote": config.promote}
                record = await _send(http, "PUT", f"/tasks/{task}", start, "swap", json=body)
                if record.status == 200:
                    if record.version != target:
                        record.error = "version"
                    active[task] = target
                traffic.swaps.append(record)

        await asyncio.gather(swapper(), *(worker(k) for k in range(config.concurrency)))
    return traffic


async def _send(
    http: httpx.AsyncClient, method: str, path: str, start: float, op: str, **kw
) -> Record:
    """One timed request; an error is the body's error type, or the client's exception."""
    began = time.monotonic()
    try:
        response = await http.request(method, path, **kw)
    except httpx.HTTPError as error:
        ms = (time.monotonic() - began) * 1000
        return Record(op, began - start, ms, None, type(error).__name__)
    record = Record(op, began - start, (time.monotonic() - began) * 1000, response.status_code)
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200:
        record.error = (body.get("error") or {}).get("type", "http")
    else:
        record.version = (body["task"] if op == "swap" else body).get("prompt_version")
    return record


async def _task_info(http: httpx.AsyncClient, task: str) -> dict:
    response = await http.get(f"/tasks/{task}")
    response.raise_for_status()
    return response.json()


async def load_tasks(url: str, config: SoakConfig) -> dict[str, dict[str, str]]:
    """Load soak0..N-1 (the LPI artifact of a source task each); task -> version -> path."""
    from safetensors import safe_open  # the header alone: no torch in the driver

    pairs = version_pairs(config.inbox)
    versions = {}
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as http:
        for i in range(config.tasks):
            task, pair = f"soak{i}", pairs[i % len(pairs)]
            response = await http.put(f"/tasks/{task}", json={"path": pair[0]})
            response.raise_for_status()
            versions[task] = {}
            for relative in pair:
                with safe_open(str(config.inbox / relative), framework="np") as handle:
                    version = json.loads(handle.metadata()["prompt_version"])
                versions[task][version] = relative
    return versions


# -- the run ------------------------------------------------------------------------------------


def run_soak(config: SoakConfig) -> dict:
    """Start the server, drive it, stop it; the report (also written to `config.out`)."""
    config.check()
    if config.backbone is None or config.inbox is None:
        raise ValueError("run_soak needs a backbone and an inbox (see build_bundle)")
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lpi-soak-") as root:
        log_file = Path(root) / "server.log"
        proc, url = start_server(config, Path(root) / "data", log_file)
        sampler = MemorySampler(proc.pid)
        try:
            versions = asyncio.run(load_tasks(url, config))
            sampler.start()  # its clock starts with the traffic, near enough
            traffic = asyncio.run(drive(url, config, versions))
        finally:
            samples = sampler.stop()
            exit_code = stop_server(proc)
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
        f"{r.op}:{r.status or 'no-answer'}:{r.error}" for r in traffic.records if r.error
    )
    failed_swaps = [r for r in traffic.swaps if r.error]
    swap_ms = [r.ms for r in traffic.swaps if not r.error]
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "ops": ops,
        "errors": dict(sorted(errors.items())),
        "five_xx": sum(1 for r in traffic.records + traffic.swaps if (r.status or 0) >= 500),
        "wrong_answers": sum(1 for r in traffic.records if r.error == "version"),
        "swaps": {
            "done": len(swap_ms),
            "failed": len(failed_swaps),
            "failures": [f"{r.status}:{r.error}" for r in failed_swaps][:20],
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


def _op_summary(records: list[Record], config: SoakConfig) -> dict:
    ok = [r.ms for r in records if r.error is None]
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


def growth(series: list[tuple[float, float]], warmup_s: float) -> dict:
    """The first sample after the warm-up against the last one (MiB), and the peak."""
    after = [mib for t, mib in series if t >= warmup_s]
    if not after:
        return dict.fromkeys(("warm_mib", "end_mib", "peak_mib", "growth_mib", "growth_pct"))
    warm, end = after[0], after[-1]
    return {
        "warm_mib": warm,
        "end_mib": end,
        "peak_mib": max(mib for _, mib in series),
        "growth_mib": end - warm,
        "growth_pct": 100 * (end - warm) / warm,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def windows(records: list[Record], samples, duration_s: float, width: float = 10.0) -> list:
    """Per `width`-second window: requests, p50 and p99 over every op, memory at its end."""
    out = []
    for start in np.arange(0.0, duration_s, width):
        inside = [r.ms for r in records if start <= r.t < start + width and r.error is None]
        memory = [m for t, m in samples if t < start + width]
        out.append({
            "t": float(start),
            "requests": len(inside),
            "p50_ms": _percentile(inside, 50),
            "p99_ms": _percentile(inside, 99),
            **{f"{n}_mib": memory[-1][n] if memory else None for n in MEMORY},
        })  # fmt: skip
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
    rows.append({
        "op": "swap", "requests": swaps["done"] + swaps["failed"], "errors": swaps["failed"],
        "per_s": None, "p50_ms": swaps["p50_ms"], "p95_ms": swaps["p95_ms"], "p99_ms": None,
    })  # fmt: skip
    print(table(OP_COLUMNS, rows))
    print()
    memory = [{"memory": name, **report["memory"][name]} for name in MEMORY]
    print(table(MEMORY_COLUMNS, memory))
    print()
    errors = report["errors"] or "none"
    print(f"5xx: {report['five_xx']}  wrong versions: {report['wrong_answers']}  "
          f"errors: {errors}  server exit: {report['server']['exit_code']}")  # fmt: skip
    if report["server"]["log_errors"]:
        print("server log errors:", *report["server"]["log_errors"], sep="\n  ")


def passed(report: dict) -> bool:
    return (
        report["five_xx"] == 0 and report["swaps"]["failed"] == 0 and report["wrong_answers"] == 0
    )


def parse_args(argv: list[str] | None = None) -> SoakConfig:
    """The run's settings; backbone and inbox stay None when the tiny bundle is to be built."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of traffic")
    parser.add_argument("--swap-interval", type=float, default=1.0, help="seconds between swaps")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds before memory counts")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop workers")
    parser.add_argument("--tasks", type=int, default=3, help="tasks loaded and swapped")
    parser.add_argument("--store", default="local", help="the server's --store")
    parser.add_argument("--id-space", type=int, default=200, help="distinct /index ids per task")
    parser.add_argument("--server-threads", type=int, default=1, help="the server's --threads")
    parser.add_argument(
        "--promote", action=argparse.BooleanOptionalAction, default=True,
        help="swaps also make the new version the searched one",
    )  # fmt: skip
    parser.add_argument("--backbone", type=Path, help="a backbone checkpoint (with --inbox)")
    parser.add_argument("--inbox", type=Path, help="folder with lpi/ and dense/ artifacts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak.json"))
    args = parser.parse_args(argv)
    if (args.backbone is None) != (args.inbox is None):
        parser.error("give both --backbone and --inbox, or neither (the tiny bundle is built)")
    config = SoakConfig(
        backbone=args.backbone, inbox=args.inbox, duration_s=args.duration,
        swap_interval_s=args.swap_interval, warmup_s=args.warmup, concurrency=args.concurrency,
        tasks=args.tasks, store=args.store, id_space=args.id_space,
        server_threads=args.server_threads, promote=args.promote, seed=args.seed, out=args.out,
    )  # fmt: skip
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
