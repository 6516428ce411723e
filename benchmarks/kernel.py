"""Prefix-attention speed for mixed-task batches (METHOD.md §7).

On a GPU, for ViT-B/16 image shapes (T=197) and text shapes (T=77, causal), in fp16 and bf16,
eager and replayed from a CUDA graph, it times three ways to compute one layer's attention for a
batch whose rows belong to several tasks:

- fused: the Triton kernel, each row's prefix rebuilt on chip from its slot's U, M;
- reference: gather U, M per row, materialise K_p, V_p, concatenate, SDPA with a boolean mask;
- ideal: SDPA over keys that already hold one prefix shared by the whole batch (attention alone,
  the floor a single-task batch could reach).

Goals (checked and printed at the end): fused >= 0.9x ideal and >= 1.5x reference, per row.
On CPU (no CUDA) only the reference path runs, at sizes set by flags, and the table compares a
batch mixing 8 tasks with a single-task batch of the same size. `--compile-table` instead
compiles the kernel ahead of time for sm_80 and sm_90 (no GPU needed, `kernels.aot`) and prints
registers, spills, shared memory and blocks per SM of each served configuration.

FLOPs count the attention that is not masked: 4 * B * H * d * (T * N + token pairs), token
pairs T^2 (T(T+1)/2 when causal). Dimensions: B rows, H heads, T tokens, d head size, N prefix
tokens, R the padded rank R', S pool slots.

    python benchmarks/kernel.py                  # on a CUDA machine: the whole GPU table
    python benchmarks/kernel.py --compile-table  # anywhere
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from benchkit import table, write_json

from kernels import reference

log = logging.getLogger("benchmarks.kernel")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
GPU_DEFAULTS = {"batch": [64, 128, 256], "tasks": [8, 64], "dtype": ["fp16", "bf16"]}
CPU_DEFAULTS = {"batch": [8], "tasks": [1, 8], "dtype": ["fp32"]}
GOALS = {"ideal_over_fused": 0.9, "reference_over_fused": 1.5}  # fused at least this fast


@dataclass(frozen=True)
class Setting:
    tower: str
    T: int
    causal: bool
    B: int
    R: int
    tasks: int
    dtype: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/kernel.json"), help="JSON results"
    )
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--batch", type=int, nargs="+", help="rows B (GPU 64 128 256; CPU 8)")
    parser.add_argument("--tasks", type=int, nargs="+", help="distinct tasks (GPU 1..256; CPU 1 8)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[5, 16], help="pool ranks R'")
    parser.add_argument("--prefix", type=int, default=16, help="prefix tokens N")
    parser.add_argument("--heads", type=int, default=12, help="heads H")
    parser.add_argument("--head-dim", type=int, default=64, help="head size d")
    parser.add_argument("--image-tokens", type=int, default=197, help="T of the image tower")
    parser.add_argument("--text-tokens", type=int, default=77, help="T of the text tower")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="GPU fp16 bf16")
    parser.add_argument("--compile-table", action="store_true", help="ahead-of-time stats only")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads (torch's default if unset)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def settings(args: argparse.Namespace) -> list[Setting]:
    """Every (tower, R', B, tasks) with tasks <= B."""
    towers = [("image", args.image_tokens, False), ("text", args.text_tokens, True)]
    return [
        Setting(tower, T, causal, B, R, tasks, dtype)
        for dtype in args.dtype
        for tower, T, causal in towers
        for R in args.ranks
        for B in args.batch
        for tasks in args.tasks
        if tasks <= B
    ]


def make_inputs(setting: Setting, args: argparse.Namespace) -> dict:
    """Random q, k, v [B, H, T, d]; a pool of `tasks` slots; rows spread over the tasks."""
    g = torch.Generator().manual_seed(args.seed)
    B, T, R, S = setting.B, setting.T, setting.R, setting.tasks
    H, d, N = args.heads, args.head_dim, args.prefix
    dtype, device = DTYPES[setting.dtype], torch.device(args.device)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    slots = (torch.arange(B) % S)[torch.randperm(B, generator=g)].to(torch.int32)
    return {
        "q": randn(B, H, T, d),
        "k": randn(B, H, T, d),
        "v": randn(B, H, T, d),
        "task_slot": slots.to(device),  # [B]
        "U_K": randn(S, N, R, scale=R**-0.5),  # [S, N, R]
        "M_K": randn(S, R, H * d),  # [S, R, H*d]
        "U_V": randn(S, N, R, scale=R**-0.5),
        "M_V": randn(S, R, H * d),
        "causal": setting.causal,
    }


def ideal_call(inputs: dict) -> Callable[[], torch.Tensor]:
    """SDPA over keys that already hold task 0's prefix for every row (prepared untimed)."""
    from torch.nn.attention.bias import causal_lower_right

    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    heads = q.shape[1]
    index = torch.zeros(1, dtype=torch.long, device=q.device)
    prefix_k = reference.materialise_prefix(inputs["U_K"], inputs["M_K"], index, heads)
    prefix_v = reference.materialise_prefix(inputs["U_V"], inputs["M_V"], index, heads)
    keys = torch.cat([prefix_k.expand(q.shape[0], -1, -1, -1), k], 2)  # [B, H, N + T, d]
    values = torch.cat([prefix_v.expand(q.shape[0], -1, -1, -1), v], 2)
    # Causal among tokens with the prefix always visible is the bottom-right-aligned mask.
    mask = causal_lower_right(q.shape[2], keys.shape[2]) if inputs["causal"] else None
    return lambda: F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def gather_sdpa_call(inputs: dict) -> Callable[[], torch.Tensor]:
    """The reference's computation (gather U, M per row, materialise, SDPA with a mask) without
    its host-side slot check, which a CUDA graph cannot capture."""
    q, k, v, slots = inputs["q"], inputs["k"], inputs["v"], inputs["task_slot"]
    index, heads = slots.clamp(min=0).long(), q.shape[1]

    def call() -> torch.Tensor:
        prefix_k = reference.materialise_prefix(inputs["U_K"], inputs["M_K"], index, heads)
        prefix_v = reference.materialise_prefix(inputs["U_V"], inputs["M_V"], index, heads)
        return reference.attention_with_prefix(
            q, k, v, prefix_k, prefix_v, slots >= 0, inputs["causal"]
        )

    return call


def time_ms(
    fn: Callable[[], torch.Tensor], warmup: int, iters: int, cuda: bool, graph: bool = False
) -> float:
    """Mean of `iters` calls between CUDA events on a GPU (with `graph`, the calls captured in
    one CUDA graph and replayed: no launch overhead); median wall time per call on CPU."""
    for _ in range(warmup):
        fn()  # also runs the autotuner, which must finish before a capture
    if cuda:
        run = fn
        if graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured):
                for _ in range(iters):
                    fn()
            run = captured.replay
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        if graph:
            run()
        else:
            for _ in range(iters):
                run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    samples = []
    for _ in range(iters):
        began = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - began) * 1e3)
    return statistics.median(samples)


def attention_flops(setting: Setting, args: argparse.Namespace) -> float:
    T = setting.T
    pairs = T * (T + 1) / 2 if setting.causal else T * T
    return 4.0 * setting.B * args.heads * args.head_dim * (T * args.prefix + pairs)


def run_gpu(setting: Setting, args: argparse.Namespace) -> dict:
    from kernels import triton_prefix_attention

    inputs = make_inputs(setting, args)
    fused = partial(triton_prefix_attention.prefix_attention, **inputs)
    slow = gather_sdpa_call(inputs)
    error = (fused().float() - slow().float()).abs().max().item()
    calls = {"fused": fused, "reference": slow, "ideal": ideal_call(inputs)}
    flops = attention_flops(setting, args)
    row = {**asdict(setting), "max_abs_diff": error}
    for mode in ("eager", "graph"):
        ms = {
            name: time_ms(call, args.warmup, args.iters, cuda=True, graph=mode == "graph")
            for name, call in calls.items()
        }
        for name, value in ms.items():
            row[f"ms_{name}_{mode}"] = value
        row[f"tflops_fused_{mode}"] = flops / ms["fused"] / 1e9
        for ratio in GOALS:
            other = ratio.split("_over_")[0]
            row[f"{ratio}_{mode}"] = ms[other] / ms["fused"]
    return row


def goal_lines(rows: list[dict]) -> list[str]:
    """Per mode and goal: the worst row's ratio against the goal."""
    lines = []
    for mode in ("eager", "graph"):
        for ratio, goal in GOALS.items():
            worst = min(rows, key=lambda r: r[f"{ratio}_{mode}"])
            value = worst[f"{ratio}_{mode}"]
            verdict = "met" if value >= goal else "NOT met"
            where = f"{worst['dtype']} {worst['tower']} B={worst['B']} R={worst['R']}"
            lines.append(f"{mode}: {ratio} >= {goal}: worst {value:.2f} ({where}) {verdict}")
    return lines


def compile_table() -> list[dict]:
    """`python -m kernels.aot` in its own process (triton must load without the interpreter)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "kernels.aot"], env=env, capture_output=True, text=True, check=True
    )
    variants = [json.loads(line) for line in done.stdout.splitlines()]
    groups: dict[tuple, list[dict]] = {}
    for v in variants:
        groups.setdefault((v["arch"], v["dtype"], v["precision"], v["tower"]), []).append(v)
    rows = []
    for (arch, dtype, precision, tower), found in groups.items():
        first = found[0]
        rows.append(
            {
                "arch": f"sm_{arch}",
                "dtype": dtype if dtype != "fp32" else f"fp32/{precision}",
                "tower": tower,
                "configs": len(found),
                "first": f"{first['block_m']}x{first['block_n']}/{first['warps']}w/"
                f"{first['stages']}s",
                "registers": first["registers"],
                "spills": f"{first['spill_stores']}/{first['spill_loads']}",
                "shared_kb": first["shared_bytes"] / 1024,
                "blocks_per_sm": first["blocks_per_sm"],
                "registers_range": f"{min(v['registers'] for v in found)}-"
                f"{max(v['registers'] for v in found)}",
                "max_spill_bytes": max(v["spill_stores"] + v["spill_loads"] for v in found),
                "blocks_range": f"{min(v['blocks_per_sm'] for v in found)}-"
                f"{max(v['blocks_per_sm'] for v in found)}",
            }
        )
    return rows


def run_cpu(setting: Setting, args: argparse.Namespace) -> dict:
    inputs = make_inputs(setting, args)
    ms = time_ms(partial(reference.prefix_attention, **inputs), args.warmup, args.iters, False)
    gflops = attention_flops(setting, args) / ms / 1e6
    return {**asdict(setting), "ms_reference": ms, "gflops_reference": gflops}


def add_cpu_ratios(rows: list[dict]) -> None:
    """Each row's time over the single-task batch of the same tower, R' and B."""
    single = {(r["tower"], r["R"], r["B"]): r["ms_reference"] for r in rows if r["tasks"] == 1}
    for row in rows:
        base = single.get((row["tower"], row["R"], row["B"]))
        row["over_single_task"] = row["ms_reference"] / base if base else None


COLUMNS = {
    "cuda": [
        ("dtype", "{}"),
        ("tower", "{}"),
        ("T", "{}"),
        ("B", "{}"),
        ("R", "{}"),
        ("tasks", "{}"),
        ("ms_fused_eager", "{:.3f}"),
        ("ms_ideal_eager", "{:.3f}"),
        ("ms_reference_eager", "{:.3f}"),
        ("ms_fused_graph", "{:.3f}"),
        ("ms_ideal_graph", "{:.3f}"),
        ("ms_reference_graph", "{:.3f}"),
        ("ideal_over_fused_eager", "{:.2f}"),
        ("reference_over_fused_eager", "{:.2f}"),
        ("ideal_over_fused_graph", "{:.2f}"),
        ("reference_over_fused_graph", "{:.2f}"),
        ("tflops_fused_graph", "{:.0f}"),
        ("max_abs_diff", "{:.1e}"),
    ],
    "compile": [
        ("arch", "{}"),
        ("dtype", "{}"),
        ("tower", "{}"),
        ("configs", "{}"),
        ("first", "{}"),
        ("registers", "{}"),
        ("spills", "{}"),
        ("shared_kb", "{:.0f}"),
        ("blocks_per_sm", "{}"),
        ("registers_range", "{}"),
        ("max_spill_bytes", "{}"),
        ("blocks_range", "{}"),
    ],
    "cpu": [
        ("tower", "{}"),
        ("T", "{}"),
        ("B", "{}"),
        ("R", "{}"),
        ("tasks", "{}"),
        ("ms_reference", "{:.2f}"),
        ("gflops_reference", "{:.1f}"),
        ("over_single_task", "{:.3f}"),
    ],
}


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.compile_table:
        rows = compile_table()
        print(table(COLUMNS["compile"], rows))
        write_json(args.out.with_name("kernel_compile.json"), {"rows": rows})
        return
    cuda = args.device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    run = run_gpu if cuda else run_cpu
    rows = []
    with torch.inference_mode():
        for setting in settings(args):
            log.info("running %s", setting)
            rows.append(run(setting, args))
    if not cuda:
        add_cpu_ratios(rows)
    print(table(COLUMNS[args.device], rows))
    if cuda:
        for line in goal_lines(rows):
            log.info("goal %s", line)
    threads = f"cpu ({torch.get_num_threads()} threads)"
    environment = {
        "device": torch.cuda.get_device_name() if cuda else threads,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "goals": goal_lines(rows) if cuda else None,
        "H": args.heads,
        "d": args.head_dim,
        "N": args.prefix,
    }
    write_json(args.out, {"environment": environment, "rows": rows})
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
