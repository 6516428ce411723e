"""What every benchmark script shares: round-robin timing, a text table, an atomic JSON write.

The scripts run as `python benchmarks/NAME.py`, so this sits beside them and imports plainly.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

from lpi import atomic


def time_calls(fns: dict[str, Callable], repeats: int, min_seconds: float) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin so drift hits all alike."""
    samples = time_rounds(fns, repeats, min_seconds)
    return {name: statistics.median(values) for name, values in samples.items()}


def time_rounds(fns: dict[str, Callable], rounds: int, min_seconds: float) -> dict[str, list]:
    """Seconds per call of each function in each round, for ratios paired by round.

    A round runs every function once (repeated to span `min_seconds`), in order, so cells
    that share a round share its load: on cores other jobs take in bursts, a ratio of two
    cells' medians moves by tens of percent, their per-round ratio far less (`paired_ratio`).
    """
    inner = {}
    for name, fn in fns.items():
        fn()  # warm-up: first-call allocations and kernel selection
        start = time.perf_counter()
        fn()
        inner[name] = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / inner[name])
    return samples


def paired_ratio(cell: list[float], base: list[float]) -> float:
    """The median over rounds of a cell's time over the base cell's time in the same round."""
    return statistics.median(c / b for c, b in zip(cell, base, strict=True))


def table(columns: list[tuple[str, str]], rows: list[dict]) -> str:
    """Right-aligned text table; `columns` pairs a row key with its format ("-" for None)."""
    cells = [[name for name, _ in columns]]
    cells += [
        [fmt.format(row[name]) if row[name] is not None else "-" for name, fmt in columns]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
        for line in cells
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def write_json(path: Path, payload: dict) -> None:
    """Atomic (lpi.atomic): a benchmark killed mid-write leaves the last complete file."""
    atomic.write_json(path, payload)
