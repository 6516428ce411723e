"""Ahead-of-time compile of the fused kernel for a GPU that is not here: what the GPU enforces.

The interpreter hides register pressure, spills, shared memory and tile legality. This module
builds the launcher's own arguments (`launch_args`, the backbone's [B, T, 3*H*d] q/k/v layout),
binds them through Triton's JIT specialisation (so the 16-byte alignment and stride-1
attributes are those a real launch gets), adds one autotuner tile config, and compiles for
sm_80 or sm_90 with the ptxas that ships with triton. No GPU is needed.

Occupancy is computed from the compiled resources: 64K registers per SM allocated per warp in
units of 256, 2048 threads per SM, shared memory per SM of 164 KB (sm_80) or 228 KB (sm_90)
with 1 KB reserved per block, at most 32 blocks per SM.

    python -m kernels.aot                  # every served configuration, JSON lines

Needs TRITON_INTERPRET unset before triton is imported (run it in its own process).
Dimensions: B rows, H heads, T tokens, d head size, N prefix tokens, R the padded rank R'.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
TOWERS = {"image": (197, False), "text": (77, True)}  # ViT-B/16: T and causal per tower


@dataclass(frozen=True)
class Variant:
    """One kernel build: target, dtype, tower shape and the tile config."""

    arch: int
    dtype: str
    tower: str
    block_m: int
    block_n: int
    warps: int
    stages: int
    precision: str = "ieee"
    heads: int = 12
    head_dim: int = 64
    prefix: int = 16
    rank: int = 16


def served_variants(
    archs: Sequence[int] = (80, 90), dtypes: Sequence[str] = ("fp16", "bf16", "fp32")
) -> list[Variant]:
    """Every (arch, dtype, tower, tile config) the autotuner may pick when serving ViT-B/16."""
    from kernels import tiles

    variants = []
    for arch in archs:
        for dtype in dtypes:
            precisions = ("ieee", "tf32x3") if dtype == "fp32" else ("ieee",)
            for tower, (tokens, _) in TOWERS.items():
                configs = tiles.tile_configs()
                for config in tiles.candidate_tiles(configs, tokens, DTYPES[dtype], arch):
                    for precision in precisions:
                        variants.append(
                            Variant(
                                arch,
                                dtype,
                                tower,
                                config.kwargs["BLOCK_M"],
                                config.kwargs["BLOCK_N"],
                                config.num_warps,
                                config.num_stages,
                                precision,
                            )
                        )
    return variants


def runtime_arguments(variant: Variant, rows: int = 2, slots: int = 4) -> tuple[list, dict]:
    """The launcher's arguments for q, k, v sliced from one projection, as the backbone does."""
    from kernels import triton_prefix_attention as fused

    tokens, causal = TOWERS[variant.tower]
    dtype, heads, head_dim = DTYPES[variant.dtype], variant.heads, variant.head_dim
    width = heads * head_dim
    qkv = torch.zeros(rows, tokens, 3 * width, dtype=dtype)  # [B, T, 3*H*d]
    q, k, v = (t.view(rows, tokens, heads, head_dim).transpose(1, 2) for t in qkv.chunk(3, -1))
    U = torch.zeros(slots, variant.prefix, variant.rank, dtype=dtype)  # [S, N, R]
    M = torch.zeros(slots, variant.rank, width, dtype=dtype)  # [S, R, H*d]
    task_slot = torch.zeros(rows, dtype=torch.int32)
    args, meta = fused.launch_args(
        q, k, v, task_slot, U, M, U.clone(), M.clone(), causal, None, variant.precision
    )
    meta = {**meta, "DOT_FP32": False, "BLOCK_M": variant.block_m, "BLOCK_N": variant.block_n}
    return args, {**meta, "num_warps": variant.warps, "num_stages": variant.stages}


def compile_variant(variant: Variant) -> dict:
    """Compile for the variant's GPU; registers, spills, shared memory and blocks per SM."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from kernels import triton_prefix_attention as fused

    kernel = fused._prefix_attention_kernel
    args, kwargs = runtime_arguments(variant)
    kwargs["debug"] = False
    target = GPUTarget("cuda", variant.arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    log = io.StringIO()
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log = knobs.compilation.always_compile = True  # a cache hit: no log
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(kernel, signature, constexprs, attrs),
                target=target,
                options=options.__dict__,
            )
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    stats = ptxas_stats(log.getvalue())
    shared = compiled.metadata.shared
    blocks = blocks_per_sm(variant.arch, stats["registers"], variant.warps, shared)
    # The arguments Triton specialised as 16-byte divisible, as a real launch does.
    aligned = sorted(kernel.arg_names[path[0]] for path, a in attrs.items() if "divisib" in str(a))
    return {
        **asdict(variant),
        **stats,
        "shared_bytes": shared,
        "blocks_per_sm": blocks,
        "aligned_args": aligned,
    }


def ptxas_stats(log: str) -> dict[str, int]:
    """Registers and spill bytes from `ptxas -v`."""
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise RuntimeError(f"no resource line in the ptxas log: {log[-500:]!r}")
    return {
        "registers": int(registers.group(1)),
        "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)),
    }


def blocks_per_sm(arch: int, registers: int, warps: int, shared: int) -> int:
    """Resident blocks per SM, the smallest of the register, thread and shared-memory limits."""
    per_warp = (registers * 32 + 255) // 256 * 256
    by_registers = 65536 // (per_warp * warps)
    by_threads = 2048 // (32 * warps)
    by_shared = SMEM_PER_SM[arch] // (shared + 1024)
    return min(by_registers, by_threads, by_shared, 32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 90])
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--tower", nargs="+", default=list(TOWERS), choices=list(TOWERS))
    parser.add_argument("--first", action="store_true", help="only the first tile config each")
    args = parser.parse_args(argv)
    seen = set()
    for variant in served_variants(tuple(args.arch), tuple(args.dtype)):
        group = (variant.arch, variant.dtype, variant.tower, variant.precision)
        if variant.tower not in args.tower or (args.first and group in seen):
            continue
        seen.add(group)
        print(json.dumps(compile_variant(variant)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
