"""Many tasks in a fleet: cold-task loads with and without routing by task, side by side.

`--tasks` (10,000) tasks registered in the catalog before the fleet starts (in-process, one
artifact shared by all, with the facts a replica publishes), then `python -m server.fleet` with 2
replicas, a working set of `--working-set` tasks and a `--pool-slots` pool. For `--samples`
random tasks each, alternating:

- plain: /embed with no routing header, sent every 20 ms until it answers 200 (409 while the
  task loads), as a client that does not name its task would;
- routed: /embed with the task in Ray Serve's multiplexing header (`serve_multiplexed_model_id`,
  what the SDK sends): the replica the proxy picks loads the task before answering;

seconds from the first request to the first 200 (p50/p95), the 409s met, and then, per task,
`--settle` seconds later (Ray's proxy learns which replica holds what from pushes every 0.1 s),
`--repeats` warm requests: the share answered by the replica that loaded the task (routing
by the header; about 1/replicas without it); and the seconds GET /fleet/tasks and GET /tasks
take to list every task.

    python benchmarks/fleet_tasks.py --tasks 10000 --samples 30
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
from benchkit import table, write_json
from fleet import VERSIONS, _quantiles, prepare

from clients.calls import TASK_ROUTING_HEADER
from server.fleet.testing import FleetProcess

log = logging.getLogger("benchmarks.fleet_tasks")
ROOT = Path(__file__).resolve().parents[1]
REPLICA_HEADER = "X-LPI-Replica"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks registered")
    parser.add_argument("--samples", type=int, default=30, help="cold tasks timed per mode")
    parser.add_argument("--repeats", type=int, default=5, help="warm requests per task")
    parser.add_argument(
        "--settle", type=float, default=0.5, help="seconds between a load and its repeats"
    )
    parser.add_argument("--working-set", type=int, default=32, help="tasks a replica holds")
    parser.add_argument("--pool-slots", type=int, default=64, help="prompt slots per replica")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--replica-cpus", type=float, default=0.5, help="Ray CPUs per replica")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks/results/fleet_tasks.json",
        help="the JSON report",
    )
    return parser.parse_args()


def register(shared: Path, artifact: Path, count: int) -> float:
    """`count` tasks in the catalog on one artifact, each with the facts GET /tasks shows (as
    a replica publishes them); seconds it took."""
    from export import read_artifact
    from server.fleet.artifacts import ArtifactStore
    from server.fleet.catalog import CatalogBook

    store, read = ArtifactStore(shared / "artifacts"), read_artifact(artifact)
    uri, version, meta = store.put(artifact), read.prompt_version, read.meta
    info = {
        "source_task": read.task_id,
        "method": meta.get("method"),
        "layers": int(meta["layers"]),
        "tokens": int(meta["tokens"]),
        "ranks": {t: int(getattr(read.folded, t).rank) for t in ("image", "text")},
        "has_keys": bool(read.keys),
        "loaded_at": time.time(),
    }
    book, started = CatalogBook(store), time.perf_counter()
    for i in range(count):
        book.publish(f"cold-{i}", version, version, {version: uri}, info)
    return time.perf_counter() - started


def first_answer(client: httpx.Client, task: str, routed: bool) -> tuple[float, int, str]:
    """Seconds to the first 200 on a cold task, the 409s before it, the answering replica."""
    headers = {TASK_ROUTING_HEADER: task} if routed else {}
    started, refused = time.perf_counter(), 0
    while True:
        r = client.post("/embed", json={"task": task, "texts": ["x"]}, headers=headers)
        if r.status_code == 200:
            return time.perf_counter() - started, refused, r.headers[REPLICA_HEADER]
        if r.status_code != 409 or time.perf_counter() - started > 60:
            raise RuntimeError(f"{task}: {r.status_code} {r.text}")
        refused += 1
        time.sleep(0.02)


def measure(url: str, args: argparse.Namespace) -> dict:
    picked = random.Random(0).sample(range(args.tasks), 2 * args.samples)
    modes = {"plain": [], "routed": []}
    with httpx.Client(base_url=url, timeout=60) as client:
        for n, i in enumerate(picked):
            mode = "routed" if n % 2 else "plain"
            task = f"cold-{i}"
            seconds, refused, loader = first_answer(client, task, mode == "routed")
            time.sleep(args.settle)  # Ray's proxy learns which replica holds what
            same = 0
            for _ in range(args.repeats):
                _, _, replica = first_answer(client, task, mode == "routed")
                same += replica == loader
            modes[mode].append((seconds, refused, same / args.repeats))
    return {
        mode: {
            "seconds": _quantiles([s for s, _, _ in rows]),
            "refusals_409": sum(r for _, r, _ in rows),
            "same_replica_share": sum(f for _, _, f in rows) / len(rows),
            "samples": len(rows),
        }
        for mode, rows in modes.items()
    }


def listing(url: str, tasks: int) -> dict:
    """Seconds for GET /fleet/tasks (every catalog task, from the answering replica's copy)
    and GET /tasks (every task's info, its vectors counted in the store)."""
    seconds: dict[str, list[float]] = {"/fleet/tasks": [], "/tasks": []}
    with httpx.Client(base_url=url, timeout=300) as client:
        for _ in range(3):
            for path, times in seconds.items():
                started = time.perf_counter()
                listed = client.get(path).json()["tasks"]
                times.append(time.perf_counter() - started)
                if len(listed) != tasks:
                    raise RuntimeError(f"{path} listed {len(listed)} of {tasks} tasks")
    return {path: _quantiles(times) for path, times in seconds.items()}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args()
    results: dict = {
        "platform": {"machine": platform.machine(), "cpus": os.cpu_count()},
        "loadavg_before": os.getloadavg(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
    }
    with tempfile.TemporaryDirectory(prefix="lpi-bench-tasks-") as tmp:
        folder = Path(tmp)
        backbone, inbox = prepare(folder)
        shared = folder / "run" / "fleet"
        shared.mkdir(parents=True)
        results["register_s"] = register(shared, inbox / VERSIONS[0], args.tasks)
        log.info("registered %d tasks in %.1f s", args.tasks, results["register_s"])
        argv = ["--backbone", str(backbone), "--artifact-dir", str(inbox)]
        argv += ["--threads", str(args.threads), "--log-level", "warning"]
        argv += ["--data-dir", str(folder / "run"), "--replicas", "2"]
        argv += ["--replica-cpus", str(args.replica_cpus)]
        argv += ["--working-set", str(args.working_set), "--pool-slots", str(args.pool_slots)]
        with FleetProcess(argv, log_path=folder / "fleet.log") as fleet:
            results["modes"] = measure(fleet.url, args)
            results["listing_s"] = listing(fleet.url, args.tasks)
    results["loadavg_after"] = os.getloadavg()
    write_json(args.out, results)
    columns = [("mode", "{}"), ("p50_s", "{:.3f}"), ("p95_s", "{:.3f}"), ("max_s", "{:.3f}")]
    columns += [("refusals_409", "{}"), ("same_replica", "{:.2f}"), ("samples", "{}")]
    rows = [
        {
            "mode": mode,
            "p50_s": m["seconds"]["p50"],
            "p95_s": m["seconds"]["p95"],
            "max_s": m["seconds"]["max"],
            "refusals_409": m["refusals_409"],
            "same_replica": m["same_replica_share"],
            "samples": m["samples"],
        }
        for mode, m in results["modes"].items()
    ]
    print(f"{args.tasks} tasks registered in {results['register_s']:.1f} s")
    print(table(columns, rows))
    for path, listed in results["listing_s"].items():
        print(f"GET {path} ({args.tasks} tasks): p50 {listed['p50']:.3f} s")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    sys.exit(main())
