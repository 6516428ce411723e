"""The serving benchmark's report: one row per concurrency level, per swap run and per goal,
their columns, and the machine it ran on (benchmarks/serving.py measures; this lays it out)."""

from __future__ import annotations

import os
import platform

import torch

MAX_BATCH = 32  # the server's default max_batch_size, which serving.py passes explicitly


def allowed_batch(level: dict) -> int:
    """The largest batch a level's load can form: one text per request, up to MAX_BATCH."""
    return min(level["concurrency"], MAX_BATCH)


def formed_batch(level: dict) -> int:
    """The mean batch the server actually formed during the level, rounded."""
    return max(1, round(level["server"].get("mean_batch_rows", 1)))


def level_row(level: dict, raw: dict) -> dict:
    formed, allowed, engine = formed_batch(level), allowed_batch(level), raw["engine"]
    latency, server = level["latency_ms"], level["server"]
    # served/raw = model_busy x model_over_raw: the worker's idle share, measured in the same
    # window as the throughput, and how fast the model ran inside the server against the raw
    # call timed afterwards (which other jobs' load can move either way).
    busy = server.get("model_busy")
    model = level["items_per_s"] / busy if busy else None  # rows/s while the model ran
    return {
        **_counts(level),
        "items_per_s": level["items_per_s"],
        "p50_ms": latency["p50"],
        "p95_ms": latency["p95"],
        "p99_ms": latency["p99"],
        "mean_batch": server.get("mean_batch_rows"),
        "model_busy": busy,
        "raw_batch": formed,
        "raw_rows_per_s": engine[formed],
        "served_over_raw": level["items_per_s"] / engine[formed],
        "allowed_batch": allowed,
        "raw_allowed_rows_per_s": engine[allowed],
        "served_over_raw_allowed": level["items_per_s"] / engine[allowed],
        "bare_rows_per_s": raw["bare"][formed],
        "model_rows_per_s": model,
        "model_over_raw": model and model / engine[formed],
    }


def _counts(level: dict) -> dict:
    """The keys every row of a `clients.load` level starts with."""
    return {
        "concurrency": level["concurrency"],
        "requests": level["requests"],
        "errors": sum(level["errors"].values()),
        "error_kinds": level["errors"],
        "req_per_s": level["requests_per_s"],
    }


def swap_row(level: dict) -> dict:
    swaps = level["swaps"]
    return {
        **_counts(level),
        "p95_ms": level["latency_ms"]["p95"],
        "swaps": swaps["count"],
        "swaps_changed": swaps["changed"],
        "swaps_failed": swaps["failed"],
        "swap_p50_ms": swaps["latency_ms"]["p50"],
        "swap_p95_ms": swaps["latency_ms"]["p95"],
        "swap_max_ms": swaps["latency_ms"]["max"],
        "failed_during_swaps": swaps["failed_requests_during_swaps"],
        "swap_server_ms": level["server"].get("swap_server_ms_mean"),
    }


LEVEL_COLUMNS = [
    ("backbone", "{}"),
    ("concurrency", "{}"),
    ("requests", "{}"),
    ("errors", "{}"),
    ("req_per_s", "{:.1f}"),
    ("p50_ms", "{:.1f}"),
    ("p95_ms", "{:.1f}"),
    ("p99_ms", "{:.1f}"),
    ("mean_batch", "{:.1f}"),
    ("model_busy", "{:.0%}"),
    ("raw_batch", "{}"),
    ("raw_rows_per_s", "{:.1f}"),
    ("served_over_raw", "{:.2f}"),
    ("model_over_raw", "{:.2f}"),
    ("allowed_batch", "{}"),
    ("raw_allowed_rows_per_s", "{:.1f}"),
    ("served_over_raw_allowed", "{:.2f}"),
]
SWAP_COLUMNS = [
    ("backbone", "{}"),
    ("concurrency", "{}"),
    ("requests", "{}"),
    ("errors", "{}"),
    ("req_per_s", "{:.1f}"),
    ("p95_ms", "{:.1f}"),
    ("swaps", "{}"),
    ("swaps_failed", "{}"),
    ("swap_p50_ms", "{:.1f}"),
    ("swap_p95_ms", "{:.1f}"),
    ("swap_max_ms", "{:.1f}"),
    ("swap_server_ms", "{:.1f}"),
    ("stale_versions", "{}"),
    ("versions_checked", "{}"),
]
GOAL_COLUMNS = [
    ("backbone", "{}"),
    ("goal", "{}"),
    ("value", "{}"),
    ("target", "{}"),
    ("met", "{}"),
]


def goal_rows(name: str, goals: dict) -> list[dict]:
    batching, served, swap = goals["batching"], goals["served_over_raw"], goals["swap"]
    middle = goals["served_over_raw_c8"]
    values = {
        "batching": f"{batching['value']:.2f}x (best c={batching['best_concurrency']}, "
        f"p95 budget {batching['p95_budget_ms']:.0f} ms; raw model's own gain "
        f"{batching['raw_ceiling']:.2f}x)",
        "served_over_raw": f"{served['value']:.2f}x (c={served['concurrency']} vs raw "
        f"B={served['raw_batch']}; {served['at_allowed_batch']:.2f}x vs B=max allowed)",
        "served_over_raw_c8": "-"
        if middle["value"] is None
        else f"{middle['value']:.2f}x (c={middle['concurrency']} vs raw B={middle['raw_batch']})",
        "swap": "-"
        if swap["value"] is None
        else f"p95 {swap['value']:.1f} ms over {swap['swaps']} swaps, {swap['failed']} failed",
    }
    return [
        {
            "backbone": name,
            "goal": goal,
            "value": values[goal],
            "target": spec["target"],
            "met": "met" if spec["met"] else "NOT met",
        }
        for goal, spec in goals.items()
    ]


def machine(threads: int) -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "omp_num_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
    }
