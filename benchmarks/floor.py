"""The physical floor beside a speed table: one core's matmul GFLOP/s per dtype, and the load.

Why: items/s mean little without what the core can do at best. A 2048 x 2048 x 2048 matmul
(2 * 2048^3 flops) is as close to peak as torch gets on a CPU; float32 runs on AVX-512 FMA,
bfloat16 on AVX512-BF16 / AMX dot products where the CPU has them. Measured by each benchmark
in its own run, on the threads it times with, so the load it saw is the load of its table.
"""

from __future__ import annotations

import logging
import os
import platform
import time

import torch

SIZE = 2048


def matmul_gflops(dtype: torch.dtype, size: int = SIZE, seconds: float = 1.0) -> float:
    """Best GFLOP/s of `size`^3 matmuls in `dtype` over about `seconds` (best: least disturbed)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    torch.mm(a, b)  # warm-up
    best, deadline = float("inf"), time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return 2 * size**3 / best / 1e9


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict:
    """What the table's numbers belong to: the CPU, the threads, the load, the floor."""
    from lpi.precision import cpu_flags

    flags = sorted(cpu_flags() & {"avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"})
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_flags": flags,
        "threads": threads,
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
        "floor_gflops_per_s": {
            "float32": round(matmul_gflops(torch.float32), 1),
            "bfloat16": round(matmul_gflops(torch.bfloat16), 1),
        },
    }


def setup(threads: int, **extra) -> dict:
    """A timing script's start: quiet logs, `threads` intra-op threads, the machine printed.

    `extra` adds what else the table's numbers belong to (a runtime's version).
    """
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(threads)
    machine = machine_info(threads) | extra
    print(f"machine: {machine}")
    return machine
