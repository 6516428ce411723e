"""Intra-op threads under contention: the model's items/s alone and while another process
takes a core, per thread count, side by side in one run.

Why: torch's OpenMP team waits at a barrier after each operator for its slowest thread, so
when another process takes one of its cores, the whole team runs at that core's leftover share
(the collapse). The server therefore defaults to the usable cores less one (server.threads);
this measures what each choice loses when a core is taken. The competitor is a busy loop
pinned to the last usable core; cells alternate (alone, contended) so drift hits both alike.

    python benchmarks/threads.py --preset ViT-B-32 --batch 8 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from benchkit import write_json
from floor import machine_info

import lpi
from lpi.precision import DTYPES
from server.threads import default_threads, usable_cores

BUSY = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--preset", default="ViT-B-32", help="backbone preset (default %(default)s)"
    )
    parser.add_argument("--batch", type=int, default=8, help="images per call (default 8)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="default bfloat16")
    parser.add_argument("--rounds", type=int, default=5, help="alone/contended pairs (median)")
    parser.add_argument("--calls", type=int, default=3, help="calls per timing (default 3)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/threads.json"))
    return parser.parse_args()


def timed(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def measure(encode, threads: int, args, core: int) -> dict:
    torch.set_num_threads(threads)
    encode()  # warm-up at this thread count
    alone, contended = [], []
    for _ in range(args.rounds):
        alone.append(timed(encode, args.calls))
        busy = subprocess.Popen([sys.executable, "-c", BUSY, str(core)])
        try:
            time.sleep(0.2)  # let it take the core
            contended.append(timed(encode, args.calls))
        finally:
            busy.kill()
            busy.wait()
    a, c = statistics.median(alone), statistics.median(contended)
    return {
        "threads": threads,
        "alone_items_per_s": args.batch / a,
        "contended_items_per_s": args.batch / c,
        "contended_over_alone": a / c,
    }


def main() -> None:
    args = parse_args()
    cores = usable_cores()
    machine = machine_info(1)
    print(f"machine: {machine}")
    model = lpi.load_backbone(args.preset, dtype=DTYPES[args.dtype])
    size = model.config.vision.image_size
    pixels = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    last = sorted(os.sched_getaffinity(0))[-1] if hasattr(os, "sched_getaffinity") else 0

    def encode():
        with torch.inference_mode():
            model.encode_image(pixels)

    print(
        f"{'threads':>7} {'alone/s':>8} {'contended/s':>11} {'kept':>6}   (default: "
        f"{default_threads(cores)} of {cores} usable cores)"
    )
    rows = []
    for threads in sorted({1, default_threads(cores), cores}):
        rows.append(measure(encode, threads, args, last))
        r = rows[-1]
        print(
            f"{threads:>7} {r['alone_items_per_s']:>8.2f} {r['contended_items_per_s']:>11.2f} "
            f"{r['contended_over_alone']:>6.2f}",
            flush=True,
        )
    machine["load_average_at_end"] = os.getloadavg()
    write_json(
        args.out,
        {
            "machine": machine,
            "preset": args.preset,
            "batch": args.batch,
            "dtype": args.dtype,
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
