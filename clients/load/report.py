"""The report on disk and on screen: the text table per level, load.json and load.png
(both atomic, mode 0644)."""

from __future__ import annotations

import json
from pathlib import Path

from clients.load.files import atomic_write
from clients.load.plot import draw_latency

COLUMNS = [
    ("concurrency", "{}"),
    ("requests", "{}"),
    ("req/s", "{:.1f}"),
    ("items/s", "{:.1f}"),
    ("p50 ms", "{:.1f}"),
    ("p90 ms", "{:.1f}"),
    ("p95 ms", "{:.1f}"),
    ("p99 ms", "{:.1f}"),
    ("batch", "{:.1f}"),
    ("busy", "{:.0%}"),
    ("swaps", "{}"),
    ("swap p50", "{:.1f}"),
    ("swap p95", "{:.1f}"),
    ("errors", "{}"),
]


def table_rows(report: dict) -> list[dict]:
    rows = []
    for level in report["levels"]:
        latency, swaps = level["latency_ms"], level["swaps"]
        server = level["server"]
        kinds = sorted(level["errors"].items()) + [
            (f"swap {kind}", n) for kind, n in sorted(swaps["errors"].items())
        ]
        errors = ", ".join(f"{kind}: {n}" for kind, n in kinds) or "none"
        rows.append(
            {
                "concurrency": level["concurrency"],
                "requests": level["requests"],
                "req/s": level["requests_per_s"],
                "items/s": level["items_per_s"],
                "p50 ms": latency["p50"],
                "p90 ms": latency["p90"],
                "p95 ms": latency["p95"],
                "p99 ms": latency["p99"],
                "batch": server.get("mean_batch_rows"),
                "busy": server.get("model_busy"),
                "swaps": swaps["count"],
                "swap p50": swaps["latency_ms"]["p50"],
                "swap p95": swaps["latency_ms"]["p95"],
                "errors": errors,
            }
        )
    return rows


def format_table(rows: list[dict], columns: list[tuple[str, str]] = COLUMNS) -> str:
    """Right-aligned text table; None prints as '-'."""
    cells = [[name for name, _ in columns]]
    cells += [
        [fmt.format(row[name]) if row.get(name) is not None else "-" for name, fmt in columns]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def write_json(path: Path, payload: dict) -> None:
    """Atomic, mode 0644 (see clients/load/files.py)."""
    atomic_write(path, json.dumps(payload, indent=1).encode())


def write_report(report: dict, out: Path) -> dict[str, Path | None]:
    """load.json and load.png in `out` (`png` None when matplotlib is not installed)."""
    paths: dict[str, Path | None] = {"json": out / "load.json", "png": out / "load.png"}
    write_json(out / "load.json", report)
    if not draw_latency(report, out / "load.png"):
        paths["png"] = None
    return paths
