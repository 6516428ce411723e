"""The server's Prometheus /metrics as the load script reads them: sums of the batch and swap
histograms, and what changed between two readings over one level."""

from __future__ import annotations

import re

_BATCH = re.compile(r'^lpi_batch_(rows|seconds)_(sum|count)\{modality="(\w+)"\} ([0-9.eE+-]+)$')
_SWAP = re.compile(r"^lpi_task_swap_seconds_(sum|count) ([0-9.eE+-]+)$")


def prometheus_sums(text: str) -> dict[str, float]:
    """'text.rows_sum', 'image.seconds_count', ..., 'swap.seconds_sum', 'swap.seconds_count'."""
    sums = {}
    for line in text.splitlines():
        if match := _BATCH.match(line):
            name, kind, modality, value = match.groups()
            sums[f"{modality}.{name}_{kind}"] = float(value)
        elif match := _SWAP.match(line):
            sums[f"swap.seconds_{match[1]}"] = float(match[2])
    return sums


def batch_delta(before: dict, after: dict, seconds: float) -> dict:
    """From the server's histograms during a level: model batches, their mean rows, the share
    of the level the model was busy (both modalities), and the server-side time of swaps."""

    def delta(*names: str) -> float:
        return sum(after.get(name, 0.0) - before.get(name, 0.0) for name in names)

    out: dict[str, float] = {}
    batches = delta("text.rows_count", "image.rows_count")
    if batches > 0:
        out["batches"] = int(batches)
        out["mean_batch_rows"] = delta("text.rows_sum", "image.rows_sum") / batches
        out["model_busy"] = delta("text.seconds_sum", "image.seconds_sum") / seconds
    swaps = delta("swap.seconds_count")
    if swaps > 0:
        out["swap_server_ms_mean"] = 1000 * delta("swap.seconds_sum") / swaps
    return out
