"""Checks of the prompt version each /embed answer names, against what the task had loaded
and the swap timeline."""

from __future__ import annotations

import bisect

from clients.load.records import Run


def check_versions(record: Run) -> tuple[int, int]:
    """Mark /embed answers whose version the task never loaded as errors ("version");
    returns (stale, checked) of the stricter check below."""
    for sample in record.samples:
        known = record.known.get(sample.task, set())
        if sample.op == "embed" and sample.error is None and sample.version not in known:
            sample.error = "version"
    return _count_stale(record)


def _count_stale(record: Run) -> tuple[int, int]:
    """/embed answers that started after a swap finished and overlapped no other swap, yet
    carry a version other than the one that swap made active (swaps run one at a time);
    returns (stale, checked): how many such answers disagreed, out of how many."""
    stale = checked = 0
    for task, info in record.tasks.items():
        swaps = [w for w in record.swaps if w.task == task]
        starts = [w.start for w in swaps]
        for sample in record.samples:
            if sample.task != task or sample.op != "embed" or sample.error is not None:
                continue
            before = bisect.bisect_left(starts, sample.end)  # swaps that began before it ended
            last = swaps[before - 1] if before else None
            if last is not None and (last.end > sample.start or last.version is None):
                continue  # overlaps a swap, or follows a failed one: either version may serve
            expected = last.version if last is not None else info["prompt_version"]
            stale += sample.version != expected
            checked += 1
    return stale, checked
