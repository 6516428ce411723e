"""The fleet's proxy overhead and where it goes: `python -m server` against a fleet of one.

For each backbone preset (random weights, written to a file; the serving dtype is the
server's `auto` unless given), one process and then a fleet of one replica serve the same
artifact; each is driven by `clients.load` (text /embed, one text per request) at concurrency
1 (the per-request latency the proxy adds) and at each --concurrency (throughput). Beside
every level, the CPU time each process spent per request (Linux `/proc`, summed over the
server's process tree and grouped by role: the server, Ray's proxy, the replica, the rest of
Ray), which says where the overhead goes whatever else the machine runs; requests/s and
latency say what a client sees, and on a shared machine only their ratios within one run mean
anything.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import httpx
from serving import TASK, load_config, random_artifact

import lpi
from clients import load
from server.fleet.testing import FleetProcess
from server.testing import ServerProcess

log = logging.getLogger("benchmarks.fleet")
ROLES = (  # the name Ray gives a worker process (its current task follows the role)
    ("ray::ProxyActor", "proxy"),
    ("ray::ServeReplica", "replica"),
    ("ray::", "ray (other actors)"),
)


def prepare_preset(folder: Path, preset: str) -> tuple[Path, Path]:
    """A backbone file of `preset` with random weights and one task artifact for it."""
    folder.mkdir(parents=True, exist_ok=True)
    backbone = lpi.load_backbone(preset, seed=0)
    path = lpi.save_backbone(backbone, folder / f"{preset}.safetensors")
    inbox = folder / f"inbox-{preset}"
    inbox.mkdir()
    random_artifact(backbone, 0, inbox / "a.safetensors", lpi.fingerprint(backbone), layers=2)
    return path, inbox


def cpu_seconds(root: int) -> dict[str, float]:
    """CPU seconds (user + system) of `root` and every process below it, by role."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(_stat(int(entry))[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    seconds: dict[str, float] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            fields = _stat(pid)
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                name = handle.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue  # it ended meanwhile
        role = "server" if pid == root else "other"
        role = next((r for prefix, r in ROLES if name.startswith(prefix)), role)
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        seconds[role] = seconds.get(role, 0.0) + ticks / os.sysconf("SC_CLK_TCK")
    return seconds


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (which may hold spaces)."""
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()


def measure(url: str, root: int, concurrency: int, seconds: float) -> dict:
    """One load level: requests/s, latency quantiles and CPU ms per request by role."""
    config = load_config(url, concurrency=(concurrency,), duration_s=seconds)
    before = cpu_seconds(root)
    level = load.summarise(asyncio.run(load.run(config)))["levels"][0]
    after = cpu_seconds(root)
    done = max(1, level["requests"])
    by_role = {r: 1000 * (after[r] - before.get(r, 0.0)) / done for r in sorted(after)}
    return {
        "concurrency": concurrency,
        "requests_per_s": level["requests_per_s"],
        "errors": sum(level["errors"].values()),
        **{q: level["latency_ms"][q] for q in ("p50", "p95", "p99")},
        "cpu_ms_per_request": sum(by_role.values()),
        "cpu_ms_by_role": by_role,
    }


def compare(folder: Path, preset: str, args) -> dict:
    """One process, then a fleet of one, on `preset`; their levels and the ratios."""
    backbone, inbox = prepare_preset(folder, preset)
    common = ["--backbone", str(backbone), "--artifact-dir", str(inbox)]
    common += ["--threads", str(args.threads), "--log-level", "warning"]
    common += ["--dtype", args.dtype]
    env = {k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    levels = [1, *args.concurrency]
    runs = {}
    single = ServerProcess([*common, "--data-dir", str(folder / f"single-{preset}")], env=env)
    with single:
        runs["single"] = _levels(single.url, single.pid, levels, args.seconds)
    fleet_args = [*common, "--data-dir", str(folder / f"fleet-{preset}"), "--replicas", "1"]
    fleet_args += ["--replica-cpus", str(args.replica_cpus)]
    with FleetProcess(fleet_args, log_path=folder / f"fleet-{preset}.log") as fleet:
        runs["fleet-1"] = _levels(fleet.url, fleet.process.pid, levels, args.seconds)
    by = {name: {lvl["concurrency"]: lvl for lvl in lvls} for name, lvls in runs.items()}
    one, many = by["single"], by["fleet-1"]
    return {
        "preset": preset,
        "runs": runs,
        "throughput_ratio": {
            c: many[c]["requests_per_s"] / one[c]["requests_per_s"] for c in args.concurrency
        },
        "added_p50_ms_at_c1": many[1]["p50"] - one[1]["p50"],
        "added_cpu_ms_per_request": {
            c: many[c]["cpu_ms_per_request"] - one[c]["cpu_ms_per_request"] for c in levels
        },
    }


def _levels(url: str, root: int, levels: list[int], seconds: float) -> list[dict]:
    httpx.put(f"{url}/tasks/{TASK}", json={"path": "a.safetensors"}, timeout=120).raise_for_status()
    measure(url, root, 1, min(2.0, seconds))  # warm-up: first batches, allocator, JIT paths
    return [measure(url, root, c, seconds) for c in levels]
