"""Tile sizes of the fused prefix-attention kernel: the autotuner's candidates, the rules that
prune them (measured by the ahead-of-time compile check, `kernels.aot`), the key a choice is
cached under, and the tiles the shapes fix. Pure functions of shapes and the GPU.

Dimensions: T tokens, d head size, N prefix tokens, R the pool's padded rank R'.
"""

from __future__ import annotations

from typing import Any

import torch
import triton

# tl.dot needs every block dimension >= 16 for fp16/bf16 on NVIDIA GPUs (>= 8 for fp32): rank,
# prefix length and head size are padded up to this by masked loads.
MIN_DOT = 16
MAX_PREFIX_BLOCK = 64


def tile_configs() -> list[triton.Config]:
    """The autotuner's candidates: BLOCK_M 64/128, BLOCK_N 32/64, 4/8 warps, 2/3 stages."""
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m in (64, 128)
        for n in (32, 64)
        for w in (4, 8)
        for s in (2, 3)
    ]


def candidate_tiles(
    configs: list[triton.Config], tokens: int, dtype: torch.dtype, arch: int
) -> list[triton.Config]:
    """The configs that compile without spills, by rules the compile check measured: a query
    block no taller than the padded T; 128 x 64 tiles need 8 warps (64 scores per thread at 4);
    on sm_8x (64K registers shared by fewer, slower dot units) 4 warps only on 64 x 64 tiles;
    fp32 (ieee dots take twice the registers) only 64-row tiles on 8 warps."""

    def keep(c: triton.Config) -> bool:
        block_m, block_n = int(c.kwargs["BLOCK_M"]), int(c.kwargs["BLOCK_N"])
        warps = int(c.num_warps)
        if block_m > max(64, pow2(tokens)):
            return False
        if dtype == torch.float32:
            return block_m == 64 and warps == 8
        if warps == 4 and block_m * block_n == 128 * 64:
            return False
        return not (arch < 90 and warps == 4 and (block_m, block_n) != (64, 64))

    return [c for c in configs if keep(c)] or configs[:1]


def prune_configs(
    configs: list[triton.Config], named_args: dict, **kwargs: Any
) -> list[triton.Config]:
    """The autotuner's early prune: `candidate_tiles` for this launch's T, dtype and GPU."""
    q = named_args["Q"]
    major, minor = torch.cuda.get_device_capability(q.device)
    return candidate_tiles(configs, named_args["T"], q.dtype, 10 * major + minor)


# The autotuner keys on these arguments (and adds every tensor argument's dtype); the GPU's
# architecture and T's bucket pick the autotuner itself (`_tuner`), as they pick the candidates.
TUNING_ARGS = ["HEAD_DIM", "N", "R", "CAUSAL", "HAS_KEY_MASK"]


def tuning_key(
    arch: int,
    tokens: int,
    head_dim: int,
    prefix_len: int,
    rank: int,
    meta: dict[str, Any],
    dtype: torch.dtype,
) -> tuple[Any, ...]:
    """What a tile choice depends on: the GPU (compute capability, e.g. 90), T's bucket (the
    next power of two: `candidate_tiles` prunes by it and timings follow it), d, N, R', the
    causal and key-mask variants, the dtype and the fp32 dot precision."""
    return (
        arch,
        pow2(tokens),
        head_dim,
        prefix_len,
        rank,
        meta["CAUSAL"],
        meta["HAS_KEY_MASK"],
        dtype,
        meta["PRECISION"],
    )


def fixed_blocks(prefix_len: int, rank: int, head_dim: int) -> dict[str, int]:
    """The tiles the shapes fix (not tuned): powers of two >= MIN_DOT, so every tl.dot is legal."""
    return {
        "BLOCK_P": min(MAX_PREFIX_BLOCK, pow2(prefix_len)),
        "BLOCK_R": pow2(rank),
        "BLOCK_D": pow2(head_dim),
    }


def interpreter_tiles(tokens: int) -> dict[str, int]:
    """One fixed tile under the interpreter: BLOCK_N half of BLOCK_M once T passes 32, so the
    causal diagonal spans two key blocks as it does with the GPU's 128 x 64 tiles."""
    block_m = min(64, pow2(tokens))
    return {"BLOCK_M": block_m, "BLOCK_N": max(MIN_DOT, block_m // 2)}


def pow2(size: int) -> int:
    return max(MIN_DOT, int(triton.next_power_of_2(size)))
