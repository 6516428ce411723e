"""How many intra-op threads the model gets: the cores this process may use, less one.

Why less one: the batcher's thread (tokenising, stacking, the next batch's bookkeeping) and the
event loop (HTTP parsing, JSON) run beside the model; a model that takes every core makes them
wait for it, and torch's OpenMP team, which waits at a barrier after each operator for its
slowest thread, loses most of a core's worth whenever another thread or process takes one of
its cores (benchmarks/threads.py measures it). The cores counted are the ones the scheduler
lets this process use (`os.sched_getaffinity`: a container's cpuset or taskset), not the
machine's.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """Cores this process may run on (affinity where the OS has it, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_threads(cores: int | None = None) -> int:
    """Intra-op threads when none are configured: one core left to the batcher and event loop."""
    cores = usable_cores() if cores is None else cores
    return max(1, cores - 1)


def apply_torch_threads(threads: int) -> int:
    """Set torch's intra-op threads (process-wide) and return how many it now uses."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    log.info("model threads: %d of %d usable cores", threads, usable_cores())
    return threads
