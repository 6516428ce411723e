"""The JSON report of a run: throughput, latency percentiles and errors by kind per level and
op, swap statistics, and every sample in compact form."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict

import numpy as np

from clients.load.config import OPS, LoadConfig
from clients.load.records import Level, Run, Sample
from clients.load.versions import check_versions

PERCENTILES = (50, 90, 95, 99)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return dict.fromkeys([*(f"p{q}" for q in PERCENTILES), "mean", "max"])
    array = np.asarray(values)
    out: dict[str, float | None] = {f"p{q}": float(np.percentile(array, q)) for q in PERCENTILES}
    return out | {"mean": float(array.mean()), "max": float(array.max())}


def summarise(record: Run) -> dict:
    """The JSON report: per level, per swap, and every sample in compact form."""
    stale, checked = check_versions(record)
    levels = [_summarise_level(record, level) for level in record.levels]
    return {
        "config": _config_dict(record.config),
        "tasks": {t: info["prompt_version"] for t, info in record.tasks.items()},
        "versions_seen": {t: sorted(v) for t, v in record.known.items()},
        "stale_versions": stale,
        "versions_checked": checked,
        "levels": levels,
        "swaps": [asdict(w) | {"latency_ms": w.latency_ms} for w in record.swaps],
        "restores": [asdict(w) for w in record.restores],
        "sample_fields": ["concurrency", "op", "task", "items", "start_s", "latency_ms", "error"],
        "samples": [_compact(s) for s in record.samples],
    }


def _compact(s: Sample) -> list:
    return [
        s.concurrency,
        s.op,
        s.task,
        s.items,
        round(s.start, 5),
        round(s.latency_ms, 3),
        s.error,
    ]


def _summarise_level(record: Run, level: Level) -> dict:
    samples = [s for s in record.samples if s.concurrency == level.concurrency]
    ok = [s for s in samples if s.error is None]
    swaps = [w for w in record.swaps if w.concurrency == level.concurrency]
    seconds = max(level.end - level.start, 1e-9)
    during = [
        s for s in samples if s.error and any(w.start < s.end and w.end > s.start for w in swaps)
    ]
    return {
        "concurrency": level.concurrency,
        "seconds": seconds,
        "requests": len(samples),
        "ok": len(ok),
        "items": sum(s.items for s in ok),
        "requests_per_s": len(ok) / seconds,
        "items_per_s": sum(s.items for s in ok) / seconds,
        "latency_ms": percentiles([s.latency_ms for s in ok]),
        "by_op": {
            op: {"requests": len(group), "latency_ms": percentiles([s.latency_ms for s in group])}
            for op in OPS
            if (group := [s for s in ok if s.op == op])
        },
        "errors": dict(Counter(s.error for s in samples if s.error)),
        "server": level.server,
        "swaps": {
            "count": len(swaps),
            "changed": sum(w.changed for w in swaps),
            "failed": sum(w.error is not None for w in swaps),
            "errors": dict(Counter(w.error for w in swaps if w.error)),
            "latency_ms": percentiles([w.latency_ms for w in swaps if w.error is None]),
            "failed_requests_during_swaps": len(during),
        },
    }


def _config_dict(config: LoadConfig) -> dict:
    out = asdict(config)
    for secret in ("api_key", "admin_key"):
        out[secret] = "***" if out[secret] else None
    return out
