"""The server under load: /embed throughput and latency, batching, and task swaps.

For each backbone (the tiny preset, and the ViT-B/32 and ViT-B/16 presets with random weights
of the real shape) the script writes the backbone and two random prompt versions of one task
"bench" to a temp folder (random prompts folded and exported, no training), starts
`python -m server` on a free loopback port in a subprocess (`server.testing.ServerProcess`:
its own process, so the client never shares its GIL), and drives it with `clients.load`:

1. /embed of one text (or one image, `--modality image`: the load script's 64 px PNGs, base64
   in JSON) per request, at concurrency 1, 8, 32 for a fixed time each;
2. the raw batched model in this process, after the server has stopped: the server's engine
   call (`TorchEngine.encode`, the task's prefix included) and the bare backbone, on batches
   of the same captions (or the same images, decoded and preprocessed before timing), same
   thread count and dtype, at the mean batch size the server formed at each level (read from
   its /metrics) and at the largest the level's load allows;
3. swaps under load: the other version PUT every 0.5 s while concurrency-8 load runs.

Threads: the server's torch and OpenMP threads, and this process's for the raw model, are
`--threads` (default: half the cores, at least 1), so the client and the server's event loop
keep a core. `--dtype` is the server's (auto: bfloat16 on this CPU for the ViT towers, which
the raw engine matches). Goals reported met or not: batching >= 3x the concurrency-1
throughput within the same p95 budget; served >= 0.8x the raw model's rows/s at the batch size
the server formed (highest concurrency), and >= 0.9x at concurrency 8; swap p95 < 50 ms with
no failed request. served/raw is the product of two figures each level also reports: the
share of the level the batcher's worker spent in the model (from /metrics, the same window)
and the model's rows/s in that time over the raw call's (a later window: other jobs' load
moves it either way). Absolute numbers belong to the machine in the JSON, with its load
average: other work on the machine slows both sides.

    python benchmarks/serving.py --backbones tiny ViT-B-16
    python benchmarks/serving.py --backbones ViT-B-32 --dtype bfloat16 --modality image
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import torch
from benchkit import table, time_calls, write_json
from PIL import Image
from serving_report import (
    GOAL_COLUMNS,
    LEVEL_COLUMNS,
    MAX_BATCH,
    SWAP_COLUMNS,
    allowed_batch,
    formed_batch,
    goal_rows,
    level_row,
    machine,
    swap_row,
)

import lpi
from clients import load
from export.artifact import write_artifact
from lpi.precision import CHOICES as DTYPE_CHOICES
from server.engine import TorchEngine
from server.testing import ServerProcess

log = logging.getLogger("benchmarks.serving")
ROOT = Path(__file__).resolve().parents[1]

TASK = "bench"
VERSIONS = ("bench-a.safetensors", "bench-b.safetensors")
SWAP_INTERVAL_S = 0.5
SWAP_CONCURRENCY = 8


@dataclass(frozen=True)
class Plan:
    """Per-backbone defaults: seconds per concurrency level, of the swap phase, p95 budget."""

    seconds: float
    swap_seconds: float
    p95_budget_ms: float


# Budgets: a tiny model answers in milliseconds, so 100 ms is a loose interactive bound;
# a ViT-B text tower (the same in B/32 and B/16) on a few CPU threads takes tens of ms per
# text, so 32 queued texts need about a second: 2 s is the interactive bound there.
PLANS = {
    "tiny": Plan(seconds=10.0, swap_seconds=12.0, p95_budget_ms=100.0),
    "ViT-B-32": Plan(seconds=20.0, swap_seconds=15.0, p95_budget_ms=2000.0),
    "ViT-B-16": Plan(seconds=20.0, swap_seconds=15.0, p95_budget_ms=2000.0),
}
SERVED_CONCURRENCY = 8  # the level of the second served/raw goal
SERVED_GOAL = 0.9  # at SERVED_CONCURRENCY


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--backbones",
        nargs="+",
        default=list(PLANS),
        choices=list(PLANS),
        help="backbone presets, random weights",
    )
    parser.add_argument(
        "--modality", choices=("text", "image"), default="text", help="what each request embeds"
    )
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="the server's and raw engine's"
    )
    parser.add_argument(
        "--concurrency",
        nargs="+",
        type=int,
        default=[1, 8, 32],
        help="closed-loop concurrency levels of the sweep",
    )
    parser.add_argument(
        "--seconds", type=float, help="seconds per level; unset: the backbone's plan"
    )
    parser.add_argument(
        "--swap-seconds", type=float, help="swap phase seconds; unset: the backbone's plan"
    )
    parser.add_argument(
        "--p95-budget-ms", type=float, help="p95 budget; unset: the backbone's plan"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="model threads, server and raw alike (half the cores)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/serving.json", help="the JSON report"
    )
    return parser.parse_args()


# -- set-up -------------------------------------------------------------------------------------


def random_artifact(
    backbone: lpi.Backbone, seed: int, path: Path, fingerprint: str, layers: int = 9
) -> Path:
    """A task version from random LPI prompts, folded and exported as training would."""
    torch.manual_seed(seed)
    depth = min(backbone.config.vision.layers, backbone.config.text.layers)
    config = lpi.PromptConfig(layers=min(layers, depth), tokens=16, rank=4)
    folded = lpi.fold_task(backbone, lpi.TaskPrompts.for_backbone(config, backbone))
    write_artifact(path, TASK, folded, backbone, backbone_fingerprint=fingerprint)
    return path


def prepare(name: str, folder: Path) -> tuple[lpi.Backbone, Path, Path]:
    """Backbone file and the inbox with two versions of the task."""
    backbone = lpi.load_backbone(name, seed=0)
    path = lpi.save_backbone(backbone, folder / f"{name}.safetensors")
    inbox = folder / "inbox"
    inbox.mkdir()
    fingerprint = lpi.fingerprint(backbone)
    for seed, version in enumerate(VERSIONS):
        random_artifact(backbone, seed, inbox / version, fingerprint)
    return backbone, path, inbox


def start_server(
    backbone: Path, inbox: Path, folder: Path, threads: int, dtype: str
) -> ServerProcess:
    """The server on the in-memory store, `threads` torch and OpenMP threads, log in `folder`."""
    args = [
        "--backbone",
        str(backbone),
        "--data-dir",
        str(folder / "data"),
        "--artifact-dir",
        str(inbox),
        "--store",
        "memory",
        "--threads",
        str(threads),
        "--max-batch-size",
        str(MAX_BATCH),
        "--dtype",
        dtype,
        "--log-level",
        "warning",
    ]
    threads_env = {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return ServerProcess(args, log_path=folder / "server.log", env=threads_env)


# -- measurements -------------------------------------------------------------------------------


def load_config(url: str, modality: str = "text", **kwargs) -> load.LoadConfig:
    return load.LoadConfig(
        url=url,
        modality=modality,
        tasks=(TASK,),
        items_per_request=1,
        weights={"embed": 1.0},
        timeout_s=120.0,
        **kwargs,
    )


def measure_served(url: str, args: argparse.Namespace, plan: Plan) -> tuple[dict, dict]:
    """The concurrency sweep, then the swap phase; both as `clients.load` reports."""
    response = httpx.put(f"{url}/tasks/{TASK}", json={"path": VERSIONS[0]}, trust_env=False)
    response.raise_for_status()
    sweep = load_config(
        url,
        args.modality,
        concurrency=tuple(args.concurrency),
        duration_s=args.seconds or plan.seconds,
    )
    swaps = load_config(
        url,
        args.modality,
        concurrency=(SWAP_CONCURRENCY,),
        duration_s=args.swap_seconds or plan.swap_seconds,
        swap_interval_s=SWAP_INTERVAL_S,
        swap_artifacts=(VERSIONS[1], VERSIONS[0]),
    )
    return (
        load.summarise(asyncio.run(load.run(sweep))),
        load.summarise(asyncio.run(load.run(swaps))),
    )


def raw_inputs(backbone: lpi.Backbone, modality: str, batch: int) -> torch.Tensor:
    """The load script's captions as token ids padded as the batcher pads them [B, T], or its
    PNGs decoded and preprocessed as the server does [B, 3, S, S]."""
    workload = load.Workload(load_config("http://unused", modality, requests=1), [TASK])
    if modality == "image":
        images = [workload.images[i % len(workload.images)] for i in range(batch)]
        decoded = [Image.open(io.BytesIO(base64.b64decode(i))).convert("RGB") for i in images]
        return lpi.preprocess(decoded, backbone.config.vision.image_size)
    captions = workload.captions
    tokens = lpi.tokenize([captions[i % len(captions)] for i in range(batch)])  # [B, 77]
    return tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]


def measure_raw(
    backbone: lpi.Backbone, inbox: Path, batches: list[int], modality: str, dtype: str
) -> dict:
    """Rows/s of the model call the batcher makes, and of the bare backbone, per batch size."""
    from export.artifact import read_artifact

    engine = TorchEngine(backbone, max_rank=16, dtype=dtype)  # casts `backbone` in place
    artifact = read_artifact(inbox / VERSIONS[0], backbone, engine.backbone_id)
    key = (TASK, artifact.prompt_version)
    engine.add(key, artifact)
    bare = backbone.encode_image if modality == "image" else backbone.encode_text
    out = {"dtype": engine.dtype, "engine": {}, "bare": {}}
    for batch in batches:
        data = raw_inputs(backbone, modality, batch)
        with torch.inference_mode():
            seconds = time_calls(
                {
                    "engine": partial(engine.encode, modality, data, [key] * batch),
                    "bare": partial(bare, data),
                },
                repeats=5,
                min_seconds=0.5,
            )
        for kind, value in seconds.items():
            out[kind][batch] = batch / value
        log.info(
            "raw batch %d: engine %.1f rows/s, bare %.1f rows/s",
            batch,
            out["engine"][batch],
            out["bare"][batch],
        )
    return out


def goals(sweep: dict, swaps: dict, raw: dict, budget_ms: float) -> dict:
    levels, engine = sweep["levels"], raw["engine"]
    base = min(levels, key=lambda level: level["concurrency"])
    within = [level for level in levels if level["latency_ms"]["p95"] <= budget_ms]
    best = max(within, key=lambda level: level["requests_per_s"], default=None)
    speedup = best["requests_per_s"] / base["requests_per_s"] if best and base in within else 0
    top = max(levels, key=lambda level: level["concurrency"])
    served_over_raw = top["items_per_s"] / engine[formed_batch(top)]
    middle = next((v for v in levels if v["concurrency"] == SERVED_CONCURRENCY), None)
    phase = swaps["levels"][0]
    swap_p95 = phase["swaps"]["latency_ms"]["p95"]
    failed = sum(phase["errors"].values()) + phase["swaps"]["failed"]
    return {
        "batching": {
            "value": speedup,
            "target": ">= 3x concurrency-1 throughput within the p95 budget",
            "p95_budget_ms": budget_ms,
            "best_concurrency": best and best["concurrency"],
            "raw_ceiling": engine[allowed_batch(top)] / engine[1],
            "met": speedup >= 3,
        },
        "served_over_raw": {
            "value": served_over_raw,
            "target": ">= 0.8x raw engine rows/s, same batch",
            "concurrency": top["concurrency"],
            "raw_batch": formed_batch(top),
            "at_allowed_batch": top["items_per_s"] / engine[allowed_batch(top)],
            "met": served_over_raw >= 0.8,
        },
        "served_over_raw_c8": {
            "value": middle and middle["items_per_s"] / engine[formed_batch(middle)],
            "target": f">= {SERVED_GOAL}x raw engine rows/s at concurrency "
            f"{SERVED_CONCURRENCY}, same batch",
            "concurrency": SERVED_CONCURRENCY,
            "raw_batch": middle and formed_batch(middle),
            "met": middle is not None
            and middle["items_per_s"] / engine[formed_batch(middle)] >= SERVED_GOAL,
        },
        "swap": {
            "value": swap_p95,
            "failed": failed,
            "swaps": phase["swaps"]["count"],
            "target": "p95 < 50 ms, no failed request",
            "met": swap_p95 is not None
            and swap_p95 < 50
            and failed == 0
            and phase["swaps"]["count"] > 0,
        },
    }


def bench_backbone(name: str, args: argparse.Namespace) -> dict:
    plan = PLANS[name]
    budget = args.p95_budget_ms or plan.p95_budget_ms
    with tempfile.TemporaryDirectory(prefix=f"bench-server-{name}-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        backbone, path, inbox = prepare(name, folder)
        log.info("%s: backbone and artifacts ready in %.1f s", name, time.perf_counter() - started)
        with start_server(path, inbox, folder, args.threads, args.dtype) as server:
            log.info("%s: server ready on %s", name, server.url)
            sweep, swaps = measure_served(server.url, args, plan)
        torch.set_num_threads(args.threads)
        levels = sweep["levels"]
        batches = {1} | {allowed_batch(v) for v in levels} | {formed_batch(v) for v in levels}
        raw = measure_raw(backbone, inbox, sorted(batches), args.modality, args.dtype)
    return {
        "modality": args.modality,
        "dtype": raw["dtype"],
        "plan": {
            "seconds": args.seconds or plan.seconds,
            "swap_seconds": args.swap_seconds or plan.swap_seconds,
            "p95_budget_ms": budget,
        },
        "levels": [level_row(level, raw) for level in sweep["levels"]],
        "swap_phase": swap_row(swaps["levels"][0])
        | {k: swaps[k] for k in ("stale_versions", "versions_checked")},
        "stale_versions": sweep["stale_versions"] + swaps["stale_versions"],
        "versions_checked": sweep["versions_checked"] + swaps["versions_checked"],
        "raw_rows_per_s": raw,
        "goals": goals(sweep, swaps, raw, budget),
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args()
    info = machine(args.threads)
    print(f"machine: {info}")
    if info["load_average_at_start"][0] > 0.5 * (info["cpus"] or 1):
        log.warning(
            "load average %.1f on %d cores: other work shares the CPUs and will slow "
            "the client and the server",
            info["load_average_at_start"][0],
            info["cpus"],
        )
    results = {name: bench_backbone(name, args) for name in args.backbones}
    info["load_average_at_end"] = os.getloadavg()
    levels = [{"backbone": n, **row} for n, r in results.items() for row in r["levels"]]
    swaps = [{"backbone": n, **r["swap_phase"]} for n, r in results.items()]
    goal_lines = [row for n, r in results.items() for row in goal_rows(n, r["goals"])]
    print(table(LEVEL_COLUMNS, levels))
    print()
    print(table(SWAP_COLUMNS, swaps))
    print()
    print(table(GOAL_COLUMNS, goal_lines))
    write_json(args.out, {"machine": info, "max_batch": MAX_BATCH, "backbones": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
