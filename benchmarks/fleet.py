"""The fleet against one process: throughput and latency, swap propagation, proxy overhead.

Writes the tiny backbone and three random prompt versions of task "bench" to a temp folder,
then, one after another on this machine:

1. `python -m server` (single process, embedded local store) and `python -m server.fleet` with
   1 and 2 replicas (local Ray cluster, store actor), each driven by `clients.load` (text
   /embed, one text per request) at concurrency 8 and 32 for `--seconds` each: requests/s and
   p50/p95/p99;
2. with 2 replicas: fleet-wide swap propagation, `--swaps` times: a PUT /tasks of the other
   version through the proxy, then /embed from 8 threads until both replicas (told apart by
   the X-LPI-Replica header) answer with it; seconds from the PUT's answer (p50/p95; goal p95
   < 2 s) and from its start;
3. the proxy's overhead (`fleet_overhead.py`), per backbone preset (`--presets`: the tiny
   one, where the proxy's cost is all there is to see, and ViT-B/32 with random weights,
   where the model's compute dominates): `python -m server` and a fleet of 1 replica at
   concurrency 1 and each `--concurrency`; requests/s ratios (goal >= 0.85x), the latency the
   proxy adds at concurrency 1, and the CPU milliseconds per request of each process (the
   server, Ray's proxy, the replica, Ray's other actors);
4. cold tasks: `--cold-tasks` (10,000) tasks registered in the catalog (in-process, through
   `CatalogBook`, before the fleet starts: one artifact shared by all), then a fleet of 2
   replicas with a working set of 32 tasks and a 64-slot pool; for `--cold-samples` random
   tasks, /embed is sent every 20 ms until it answers 200 (409 while the task loads): p50/p95
   seconds from the first request.

Every figure belongs to the machine and load recorded in the JSON (`platform`, `loadavg`): on
a 2-core machine two replicas share the cores that one process had, so the second replica
cannot add throughput here; the projection to 16 cores scales the 1-replica figure by the
replicas 16 cores hold at `--threads` + 1 cores each (an upper bound: it assumes the proxy
keeps up).

    python benchmarks/fleet.py --seconds 10 --swaps 20
    python benchmarks/fleet.py --parts overhead --presets tiny ViT-B-32 --seconds 8
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
from benchkit import table, write_json
from fleet_overhead import compare
from serving import TASK, VERSIONS, load_config, random_artifact

import lpi
from clients import load
from server.fleet.testing import FleetProcess
from server.testing import ServerProcess

log = logging.getLogger("benchmarks.fleet")
ROOT = Path(__file__).resolve().parents[1]
PROPAGATION_GOAL_S = 2.0
OVERHEAD_GOAL = 0.85
PARTS = ("scaling", "propagation", "cold", "overhead")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="per concurrency level")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[8, 32], help="load levels")
    parser.add_argument("--swaps", type=int, default=20, help="swap propagation samples")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server/replica")
    parser.add_argument("--replica-cpus", type=float, default=0.5, help="Ray CPUs per replica")
    parser.add_argument("--cold-tasks", type=int, default=10_000, help="tasks registered (0: skip)")
    parser.add_argument("--cold-samples", type=int, default=40, help="cold loads timed")
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure"
    )
    parser.add_argument(
        "--presets", nargs="+", default=["tiny", "ViT-B-32"], help="overhead: backbones"
    )
    parser.add_argument("--dtype", default="auto", help="overhead: the serving dtype")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/fleet.json", help="the JSON report"
    )
    return parser.parse_args()


def prepare(folder: Path) -> tuple[Path, Path]:
    backbone = lpi.load_backbone("tiny", seed=0)
    path = lpi.save_backbone(backbone, folder / "tiny.safetensors")
    inbox = folder / "inbox"
    inbox.mkdir()
    fingerprint = lpi.fingerprint(backbone)
    for seed, name in enumerate(VERSIONS):
        random_artifact(backbone, seed, inbox / name, fingerprint, layers=2)
    return path, inbox


def sweep(url: str, args: argparse.Namespace) -> list[dict]:
    httpx.put(f"{url}/tasks/{TASK}", json={"path": VERSIONS[0]}, timeout=60).raise_for_status()
    answered = 0  # every replica holds it (the fleet converges within seconds, not at once)
    while answered < 10:
        ok = httpx.get(f"{url}/tasks/{TASK}", timeout=60).status_code == 200
        answered = answered + 1 if ok else 0
    config = load_config(url, concurrency=tuple(args.concurrency), duration_s=args.seconds)
    levels = load.summarise(asyncio.run(load.run(config)))["levels"]
    return [
        {
            "concurrency": level["concurrency"],
            "requests_per_s": level["requests_per_s"],
            "errors": sum(level["errors"].values()),
            **{k: level["latency_ms"][k] for k in ("p50", "p95", "p99")},
        }
        for level in levels
    ]


def propagation(url: str, swaps: int) -> dict:
    """Seconds until both replicas serve a freshly loaded version, `swaps` times."""
    from_ack, from_start = [], []
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(swaps):
            name = VERSIONS[(i + 1) % 2]
            started = time.perf_counter()
            loaded = client.put(f"/tasks/{TASK}", json={"path": name})
            loaded.raise_for_status()
            acked = time.perf_counter()
            version = loaded.json()["task"]["prompt_version"]
            seen: dict[str, str] = {}
            done = threading.Event()

            def probe(version=version, seen=seen, done=done) -> None:
                with httpx.Client(base_url=url, timeout=60) as own:
                    while not done.is_set():
                        r = own.post("/embed", json={"task": TASK, "texts": ["x"]})
                        if r.status_code == 200:
                            seen[r.headers["X-LPI-Replica"]] = r.json()["prompt_version"]
                        if sum(v == version for v in seen.values()) >= 2:
                            done.set()

            threads = [threading.Thread(target=probe) for _ in range(8)]
            for thread in threads:
                thread.start()
            done.wait(30)
            converged = time.perf_counter()
            done.set()
            for thread in threads:
                thread.join()
            from_ack.append(converged - acked)
            from_start.append(converged - started)
    return {
        "from_ack_s": _quantiles(from_ack),
        "from_put_s": _quantiles(from_start),
        "samples": swaps,
    }


def register(shared: Path, artifact: Path, count: int) -> float:
    """`count` tasks in the fleet's catalog, all on one artifact; seconds it took."""
    from export import read_artifact
    from server.fleet.artifacts import ArtifactStore
    from server.fleet.catalog import CatalogBook

    store = ArtifactStore(shared / "artifacts")
    uri, version = store.put(artifact), read_artifact(artifact).prompt_version
    book, started = CatalogBook(store), time.perf_counter()
    for i in range(count):
        book.publish(f"cold-{i}", version, version, {version: uri})
    return time.perf_counter() - started


def cold_loads(url: str, count: int, samples: int) -> dict:
    """Seconds from the first /embed of a task no replica holds until one answers 200."""
    import random

    tasks, seconds, refused = random.Random(0).sample(range(count), samples), [], 0
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in tasks:
            started = time.perf_counter()
            while True:
                r = client.post("/embed", json={"task": f"cold-{i}", "texts": ["x"]})
                if r.status_code == 200:
                    break
                if r.status_code != 409 or time.perf_counter() - started > 60:
                    raise RuntimeError(f"cold-{i}: {r.status_code} {r.text}")
                refused += 1
                time.sleep(0.02)
            seconds.append(time.perf_counter() - started)
    return {"seconds": _quantiles(seconds), "samples": samples, "refusals_409": refused}


def _quantiles(values: list[float]) -> dict:
    cuts = statistics.quantiles(values, n=20, method="inclusive") if len(values) > 1 else values
    return {"p50": statistics.median(values), "p95": cuts[-1], "max": max(values)}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request slows the client
    args = parse_args()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the fleet's Ray processes inherit it
        os.environ[name] = str(args.threads)
    results: dict = {
        "platform": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "loadavg_before": os.getloadavg(),
        "threads": args.threads,
        "replica_cpus": args.replica_cpus,
        "seconds": args.seconds,
        "parts": args.parts,
    }
    with tempfile.TemporaryDirectory(prefix="lpi-bench-fleet-") as tmp:
        folder = Path(tmp)
        backbone, inbox = prepare(folder)
        common = ["--backbone", str(backbone), "--artifact-dir", str(inbox)]
        common += ["--threads", str(args.threads), "--log-level", "warning"]
        if "scaling" in args.parts or "propagation" in args.parts:
            scaling(folder, common, args, results)
        if "cold" in args.parts and args.cold_tasks:
            results["cold"] = cold(folder, common, inbox, args)
        if "overhead" in args.parts:
            results["overhead"] = []
            for preset in args.presets:
                log.info("overhead on %s", preset)
                results["overhead"].append(compare(folder / "overhead", preset, args))
                (folder / "overhead" / f"{preset}.safetensors").unlink()  # ViT-B: 600 MB
    results["loadavg_after"] = os.getloadavg()
    results["goals"] = goals(results, args)
    write_json(args.out, results)
    report(results)
    log.info("wrote %s", args.out)


def scaling(folder: Path, common: list[str], args: argparse.Namespace, results: dict) -> None:
    """One process, fleets of 1 and 2 replicas (load sweeps); swap propagation on 2."""
    env = {k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    runs = results["runs"] = {}
    if "scaling" in args.parts:
        with ServerProcess([*common, "--data-dir", str(folder / "single")], env=env) as single:
            log.info("python -m server at %s", single.url)
            runs["single"] = sweep(single.url, args)
    for replicas in (1, 2) if "scaling" in args.parts else (2,):
        fleet_args = [*common, "--data-dir", str(folder / f"fleet{replicas}")]
        fleet_args += ["--replicas", str(replicas), "--replica-cpus", str(args.replica_cpus)]
        with FleetProcess(fleet_args, log_path=folder / f"fleet{replicas}.log") as fleet:
            log.info("fleet of %d at %s", replicas, fleet.url)
            if "scaling" in args.parts:
                runs[f"fleet-{replicas}"] = sweep(fleet.url, args)
            if replicas == 2 and "propagation" in args.parts:
                if "scaling" not in args.parts:
                    sweep(fleet.url, args)  # loads the task on both replicas
                results["propagation"] = propagation(fleet.url, args.swaps)


def cold(folder: Path, common: list[str], inbox: Path, args: argparse.Namespace) -> dict:
    shared = folder / "cold" / "fleet"
    shared.mkdir(parents=True)
    took = register(shared, inbox / VERSIONS[0], args.cold_tasks)
    log.info("registered %d tasks in %.1f s", args.cold_tasks, took)
    cold_args = [*common, "--data-dir", str(folder / "cold"), "--replicas", "2"]
    cold_args += ["--replica-cpus", str(args.replica_cpus)]
    cold_args += ["--working-set", "32", "--pool-slots", "64"]
    with FleetProcess(cold_args, log_path=folder / "cold.log") as fleet:
        measured = cold_loads(fleet.url, args.cold_tasks, args.cold_samples)
    return measured | {
        "tasks": args.cold_tasks,
        "register_s": took,
        "working_set": 32,
        "pool_slots": 64,
    }


def goals(results: dict, args: argparse.Namespace) -> dict:
    out: dict = {}
    by = {
        name: {lvl["concurrency"]: lvl for lvl in lvls}
        for name, lvls in results.get("runs", {}).items()
    }
    for entry in results.get("overhead", []):
        ratios = entry["throughput_ratio"]
        out[f"proxy_overhead_{entry['preset']}"] = {
            "value": ratios,
            "added_p50_ms_at_c1": entry["added_p50_ms_at_c1"],
            "added_cpu_ms_per_request": entry["added_cpu_ms_per_request"],
            "target": f">= {OVERHEAD_GOAL}x python -m server",
            "met": min(ratios.values()) >= OVERHEAD_GOAL,
        }
    if {"single", "fleet-1", "fleet-2"} <= by.keys():
        out["two_over_one_replica"] = {
            c: by["fleet-2"][c]["requests_per_s"] / by["fleet-1"][c]["requests_per_s"]
            for c in args.concurrency
        }
        per_16 = int(16 // (args.threads + 1))  # its torch threads + its loop and the proxy's
        top = max(args.concurrency)
        out["projection_16_cores"] = {
            "replicas": per_16,
            "requests_per_s": per_16 * by["fleet-1"][top]["requests_per_s"],
            "basis": f"{per_16} replicas of {args.threads} thread(s) + 1 core each x the "
            f"1-replica figure at concurrency {top} (assumes linear scaling and a proxy "
            "that keeps up: an upper bound)",
        }
    if "propagation" in results:
        p95 = results["propagation"]["from_ack_s"]["p95"]
        out["propagation"] = {
            "value": p95,
            "target": f"p95 < {PROPAGATION_GOAL_S} s after the ack",
            "met": p95 < PROPAGATION_GOAL_S,
        }
    if "cold" in results:
        out["cold_task_load"] = results["cold"]
    return out


def report(results: dict) -> None:
    columns = [("server", "{}"), ("concurrency", "{}"), ("requests_per_s", "{:.1f}")]
    columns += [(q, "{:.1f}") for q in ("p50", "p95", "p99")] + [("errors", "{}")]
    rows = [{"server": n, **lvl} for n, lvls in results.get("runs", {}).items() for lvl in lvls]
    if rows:
        print(table(columns, rows))
    if "propagation" in results:
        prop = results["propagation"]
        ack, put = prop["from_ack_s"], prop["from_put_s"]
        print(
            f"swap propagation (2 replicas, {prop['samples']} swaps): after the ack p50 "
            f"{ack['p50']:.3f} s, p95 {ack['p95']:.3f} s; from the PUT p50 {put['p50']:.3f} s, "
            f"p95 {put['p95']:.3f} s"
        )
    if "cold" in results:
        cold = results["cold"]
        print(
            f"cold task load ({cold['tasks']} tasks registered in {cold['register_s']:.1f} s, "
            f"working set 32, 64 slots): p50 {cold['seconds']['p50']:.3f} s, p95 "
            f"{cold['seconds']['p95']:.3f} s over {cold['samples']} tasks"
        )
    overhead = [
        {"preset": e["preset"], "server": name, **lvl}
        | {"cpu_" + k.split(" ")[0]: v for k, v in lvl["cpu_ms_by_role"].items()}
        for e in results.get("overhead", [])
        for name, lvls in e["runs"].items()
        for lvl in lvls
    ]
    if overhead:
        roles = sorted(
            {k for row in overhead for k in row if k.startswith("cpu_") and k != "cpu_ms_by_role"}
        )
        for row in overhead:
            row.update({r: row.get(r) for r in roles})
        print(table([("preset", "{}"), *columns, *[(r, "{:.2f}") for r in roles]], overhead))
    for name, goal in results["goals"].items():
        print(f"{name}: {goal}")


if __name__ == "__main__":
    main()
