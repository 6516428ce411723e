"""load.png: latency of every request over the run, one colour per operation, its p50 and p99
as lines, swaps as vertical markers, failures as red crosses (matplotlib, optional).

matplotlib is imported only here and only when a plot is drawn; without it the report is
written without the PNG, and the run says how to get one.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from clients.load.files import atomic_write

log = logging.getLogger("clients.load")
COLOURS = {"embed": "#1f77b4", "search": "#2ca02c", "index": "#9467bd"}
SWAP, FAILED = "#ff7f0e", "#d62728"
SIZE_IN, DPI = (12.0, 6.5), 100  # 1200 x 650 pixels


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def draw_latency(report: dict, path: Path) -> bool:
    """Draw the plot to `path`; False (with a log line) when matplotlib is not installed."""
    if not have_matplotlib():
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)", path.name)
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fields = report["sample_fields"]
    names = ("op", "start_s", "latency_ms", "error")
    op_at, start_at, ms_at, error_at = (fields.index(name) for name in names)
    samples = report["samples"]
    with plt.rc_context({"font.size": 12, "axes.titlesize": 14, "axes.labelsize": 13}):
        figure, axes = plt.subplots(figsize=SIZE_IN, dpi=DPI, layout="constrained")
        for op in sorted({s[op_at] for s in samples}):
            ok = np.array(
                [(s[start_at], s[ms_at]) for s in samples if s[op_at] == op and s[error_at] is None]
            ).reshape(-1, 2)
            if not len(ok):
                continue
            colour = COLOURS.get(op, "#7f7f7f")
            axes.scatter(
                ok[:, 0], ok[:, 1], s=9, alpha=0.55, color=colour, label=f"{op} ({len(ok)})"
            )
            p50, p99 = np.percentile(ok[:, 1], [50, 99])
            axes.axhline(
                p50, color=colour, linestyle="--", linewidth=1.4, label=f"{op} p50 {p50:.1f} ms"
            )
            axes.axhline(
                p99, color=colour, linestyle=":", linewidth=1.8, label=f"{op} p99 {p99:.1f} ms"
            )
        failed = np.array(
            [(s[start_at], s[ms_at]) for s in samples if s[error_at] is not None]
        ).reshape(-1, 2)
        if len(failed):
            axes.scatter(
                failed[:, 0],
                failed[:, 1],
                marker="x",
                s=40,
                color=FAILED,
                label=f"failed ({len(failed)})",
            )
        for i, swap in enumerate(report["swaps"]):
            axes.axvline(
                swap["start"],
                color=FAILED if swap["error"] else SWAP,
                linewidth=1.2,
                alpha=0.8,
                label="task swap" if i == 0 else None,
            )
        axes.set_xlabel("seconds since the run began")
        axes.set_ylabel("latency (ms)")
        axes.set_ylim(bottom=0)
        axes.set_title("Request latency over time, by operation")
        axes.grid(True, alpha=0.3)
        axes.legend(loc="upper left", fontsize=10, ncols=2, framealpha=0.9)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        plt.close(figure)
    atomic_write(path, buffer.getvalue())
    return True
