"""Fused prefix attention in Triton: task prefixes rebuilt on chip (METHOD.md §7).

    out[b] = softmax([q K_p^T , q k^T] / sqrt(d) + mask) @ [V_p ; v],   K_p = U_K[slot] @ M_K[slot]

A 1-D grid, one program per (row, head, query block): CUDA caps a grid's second axis at 65,535
but its first at 2^31 - 1. The program first issues the loads of its head's M_K, M_V columns,
then runs an online softmax (FlashAttention) over the token blocks, unmasked below the causal
diagonal and masked on it; then over the prefix, each K_p / V_p tile rebuilt in registers from
U tiles (never in global memory). The prefix is always visible; causal and key-padding masks
apply among tokens; slot -1 skips the prefix and its loads. Row offsets are 64-bit, so a batch
whose tensors pass 2^31 elements indexes correctly. The output is written as [B, T, H, d] and
returned as a [B, H, T, d] view, so merging heads afterwards is a view, not a copy.

Tiles (BLOCK_M, BLOCK_N), warps and pipeline stages are autotuned on a GPU once per
`tuning_key` (GPU architecture, T's power-of-two bucket, d, N, R', causal, key mask, dtype,
precision); under the interpreter (TRITON_INTERPRET=1) one small fixed tile runs instead.

Dimensions: B rows, H heads, T tokens, d head size, N prefix tokens, R the pool's padded rank
R', S pool slots. This module imports triton at the top: only `kernels.dispatch` (and the
ahead-of-time check, `kernels.aot`) import it, and only when a GPU or the interpreter runs it.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.reference import check_prefix_inputs, check_slots
from kernels.tiles import (
    TUNING_ARGS,
    fixed_blocks,
    interpreter_tiles,
    prune_configs,
    tile_configs,
    tuning_key,
)

LOG2_E = 1.4426950408889634
INT32_MAX = 2**31 - 1
# fp32 inputs: "ieee" (exact fp32 dots, the default) or "tf32x3" (three TF32 dots, ~fp32 error).
FP32_PRECISIONS = ("ieee", "tf32x3")
INTERPRETING = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b, fp32 accumulation; DOT_FP32 upcasts first (the interpreter's bf16 dot is wrong)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _softmax_step(acc, m_i, l_i, s, v, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update with scores s [BLOCK_M, K] (log2 units, -inf = hidden), v [K, D]."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32, PRECISION)
    return acc, m_new, l_i


@triton.jit
def _token_blocks(
    acc,
    m_i,
    l_i,
    q,
    k_row,
    v_row,
    mask_row,
    offs_m,
    offs_d,
    d_ok,
    lo,
    hi,
    T,
    stride_kt,
    stride_vt,
    qk_scale,
    DIAGONAL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Keys lo..hi of this row and head; DIAGONAL applies the causal mask (keys <= query)."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T
        k_ptrs = k_row + offs_n[None, :] * stride_kt + offs_d[:, None]
        k_t = tl.load(k_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [D, BLOCK_N]
        v_ptrs = v_row + offs_n[:, None] * stride_vt + offs_d[None, :]
        v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, D]
        s = _dot(q, k_t, DOT_FP32, PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        visible = n_ok[None, :]
        if HAS_KEY_MASK:
            real = tl.load(mask_row + offs_n, mask=n_ok, other=0)
            visible = visible & (real != 0)[None, :]
        if DIAGONAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(visible, s, float("-inf"))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, DOT_FP32, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _prefix_attention_kernel(
    Q,
    K,
    V,
    Out,
    Slot,
    UK,
    MK,
    UV,
    MV,
    KeyMask,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_us,
    stride_un,
    stride_ms,
    stride_mr,
    stride_maskb,
    H,
    T,
    N,
    R,
    S,
    HEAD_DIM,
    qk_scale,
    CAUSAL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    m_blocks = tl.cdiv(T, BLOCK_M)
    pid = tl.program_id(0)
    pid_bh = pid // m_blocks
    pid_m = m_blocks - 1 - pid % m_blocks  # the longest causal blocks start first
    b = (pid_bh // H).to(tl.int64)  # 64-bit: b * stride passes 2^31 in large batches
    h = pid_bh % H
    dtype = Q.dtype.element_ty

    # The slot first, so the M loads below are in flight while the token loop runs.
    slot = tl.load(Slot + b)
    in_pool = (slot >= 0) & (slot < S)
    outside = (slot < -1) | (slot >= S)  # never read: the row's output becomes NaN
    slot = tl.where(in_pool, slot, 0).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    d_ok = offs_d < HEAD_DIM
    r_ok = (offs_r < R) & in_pool  # padded ranks and slot -1 load zeros (no memory traffic)
    m_cols = slot * stride_ms + h * HEAD_DIM
    mk_ptrs = MK + m_cols + offs_r[None, :] * stride_mr + offs_d[:, None]
    mk_t = tl.load(mk_ptrs, mask=d_ok[:, None] & r_ok[None, :], other=0.0)  # [D, BLOCK_R]
    mv_ptrs = MV + m_cols + offs_r[:, None] * stride_mr + offs_d[None, :]
    mv = tl.load(mv_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_R, D]

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < T) & d_ok[None, :], other=0.0)  # [BLOCK_M, D]
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Tokens: blocks below the diagonal need no causal mask; the diagonal block does.
    k_row = K + b * stride_kb + h * stride_kh
    v_row = V + b * stride_vb + h * stride_vh
    mask_row = KeyMask + b * stride_maskb
    diagonal = T
    if CAUSAL:
        diagonal = pid_m * BLOCK_M  # BLOCK_M is a multiple of BLOCK_N
    # Unrolled at compile time: the blocks below the diagonal, then (causal only) the diagonal's.
    for on_diagonal in tl.static_range(1 + CAUSAL):
        lo = diagonal if on_diagonal else 0
        hi = tl.minimum(T, (pid_m + 1) * BLOCK_M) if on_diagonal else diagonal
        acc, m_i, l_i = _token_blocks(
            acc,
            m_i,
            l_i,
            q,
            k_row,
            v_row,
            mask_row,
            offs_m,
            offs_d,
            d_ok,
            lo,
            hi,
            T,
            stride_kt,
            stride_vt,
            qk_scale,
            on_diagonal == 1,
            HAS_KEY_MASK,
            DOT_FP32,
            PRECISION,
            BLOCK_N,
        )

    # Prefix: K_p^T / V_p tiles rebuilt from this slot's U tiles; slot -1 runs zero times.
    n_prefix = tl.where(in_pool, N, 0)
    for p0 in range(0, n_prefix, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < N
        uk_ptrs = UK + slot * stride_us + offs_p[None, :] * stride_un + offs_r[:, None]
        uk_t = tl.load(uk_ptrs, mask=r_ok[:, None] & p_ok[None, :], other=0.0)  # [BLOCK_R, P]
        uv_ptrs = UV + slot * stride_us + offs_p[:, None] * stride_un + offs_r[None, :]
        uv = tl.load(uv_ptrs, mask=p_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_P, R]
        kp_t = _dot(mk_t, uk_t, DOT_FP32, PRECISION).to(dtype)  # [D, P] = (U_K @ M_K)^T tile
        vp = _dot(uv, mv, DOT_FP32, PRECISION).to(dtype)  # [BLOCK_P, D] = U_V @ M_V tile
        s = _dot(q, kp_t, DOT_FP32, PRECISION) * qk_scale  # [BLOCK_M, BLOCK_P]
        s = tl.where(p_ok[None, :], s, float("-inf"))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, vp, DOT_FP32, PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a query that saw no key gets zeros
    out = tl.where(outside, float("nan"), out)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(dtype), mask=(offs_m[:, None] < T) & d_ok[None, :])


_best: dict[tuple, dict[str, Any]] = {}  # tuning_key(...) -> tile config


@functools.cache
def _tuner(arch: int, token_bucket: int) -> Any:
    """One autotuner per (GPU architecture, T bucket): Triton's own cache keys on arguments
    only, so one shared autotuner would reuse the tiles the first T (or GPU) left in it."""
    return triton.autotune(
        configs=tile_configs(),
        key=TUNING_ARGS,
        prune_configs_by={"early_config_prune": prune_configs},
    )(_prefix_attention_kernel)


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    task_slot: Tensor,
    U_K: Tensor,
    M_K: Tensor,
    U_V: Tensor,
    M_V: Tensor,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    *,
    fp32_precision: str = "ieee",
) -> Tensor:
    """Fused twin of `kernels.reference.prefix_attention`; [B, H, T, d] in q's dtype, stored
    [B, T, H, d] (a transposed view). A slot outside [-1, S) gives its row NaN on a GPU (checked
    on chip, no host sync) and ValueError for CPU slots; nothing is read out of bounds."""
    args, meta = launch_args(
        q, k, v, task_slot, U_K, M_K, U_V, M_V, causal, key_padding_mask, fp32_precision
    )
    out: Tensor = args[3]
    if INTERPRETING or not q.is_cuda:
        _prefix_attention_kernel[(_programs(q, meta["BLOCK_M"]),)](*args, **meta)
        return out
    if q.device.index != torch.cuda.current_device():  # Triton launches on the current device
        with torch.cuda.device(q.device):
            _launch_tuned(q, args, meta)
    else:
        _launch_tuned(q, args, meta)
    return out


def launch_args(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    task_slot: Tensor,
    U_K: Tensor,
    M_K: Tensor,
    U_V: Tensor,
    M_V: Tensor,
    causal: bool,
    key_padding_mask: Tensor | None,
    fp32_precision: str = "ieee",
) -> tuple[list, dict[str, Any]]:
    """Check the inputs, allocate the output and return the kernel's positional arguments and
    constexprs (tiles chosen by the autotuner on a GPU, fixed under the interpreter). The
    ahead-of-time compile check builds exactly this variant."""
    check_prefix_inputs(q, k, v, task_slot, U_K, M_K, U_V, M_V, key_padding_mask)
    check_kernel_layout(q, k, v, task_slot, U_K, M_K, U_V, M_V)
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {fp32_precision!r}")
    rows, heads, tokens, head_dim = q.shape
    slots, prefix_len, rank = U_K.shape
    if not task_slot.is_cuda:
        check_slots(task_slot, slots)  # free on the host; on a GPU the kernel checks on chip
    out = q.new_empty(rows, tokens, heads, head_dim).transpose(1, 2)  # [B, H, T, d] view
    key_mask = task_slot if key_padding_mask is None else _as_bytes(key_padding_mask)
    args = [
        q,
        k,
        v,
        out,
        task_slot,
        U_K,
        M_K,
        U_V,
        M_V,
        key_mask,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *out.stride()[:3],
        *U_K.stride()[:2],
        *M_K.stride()[:2],
        key_mask.stride(0),
        heads,
        tokens,
        prefix_len,
        rank,
        slots,
        head_dim,
        head_dim**-0.5 * LOG2_E,
    ]
    interpret_bf16 = INTERPRETING and q.dtype == torch.bfloat16
    meta = {
        "CAUSAL": causal,
        "HAS_KEY_MASK": key_padding_mask is not None,
        "DOT_FP32": interpret_bf16,
        "PRECISION": fp32_precision if q.dtype == torch.float32 else "ieee",
        **fixed_blocks(prefix_len, rank, head_dim),
    }
    if INTERPRETING or not q.is_cuda:
        meta |= interpreter_tiles(tokens)
    return args, meta


def check_kernel_layout(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    task_slot: Tensor,
    U_K: Tensor,
    M_K: Tensor,
    U_V: Tensor,
    M_V: Tensor,
) -> None:
    """What the kernel indexes: stride 1 in the last dimension of q, k, v, a contiguous pool and
    slot vector, a grid within 2^31 - 1 programs and one row's span within 32-bit offsets."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must have stride 1 in its last dimension: {tensor.stride()}")
    pool = (("U_K", U_K), ("M_K", M_K), ("U_V", U_V), ("M_V", M_V), ("task_slot", task_slot))
    for name, tensor in pool:
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous; got strides {tensor.stride()}")
    rows, heads, tokens, head_dim = q.shape
    if rows * heads * triton.cdiv(tokens, 64) > INT32_MAX:
        raise ValueError(f"batch too large for one launch: B*H={rows * heads} at T={tokens}")
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        span = (heads - 1) * tensor.stride(1) + (tokens - 1) * tensor.stride(2) + head_dim
        if span > INT32_MAX:
            raise ValueError(f"one row of {name} spans {span} elements, past 32-bit offsets")


def _launch_tuned(q: Tensor, args: list, meta: dict[str, Any]) -> None:
    """The first call per key runs Triton's autotuner; later calls launch its pick directly
    (the autotuner's own per-call bookkeeping costs microseconds)."""
    major, minor = torch.cuda.get_device_capability(q.device)
    tokens, head_dim, prefix_len, rank = q.shape[2], args[-2], args[-5], args[-4]
    key = tuning_key(10 * major + minor, tokens, head_dim, prefix_len, rank, meta, q.dtype)
    tiles = _best.get(key)
    if tiles is None:
        tuner = _tuner(key[0], key[1])
        tuner[lambda m: (_programs(q, m["BLOCK_M"]),)](*args, **meta)
        config = tuner.best_config
        tiles = _best[key] = {
            **config.kwargs,
            "num_warps": config.num_warps,
            "num_stages": config.num_stages,
        }
        return
    _prefix_attention_kernel[(_programs(q, tiles["BLOCK_M"]),)](*args, **meta, **tiles)


def _programs(q: Tensor, block_m: int) -> int:
    rows, heads, tokens, _ = q.shape
    return int(triton.cdiv(tokens, block_m)) * rows * heads


def _as_bytes(key_padding_mask: Tensor) -> Tensor:
    """[B, T] bool -> uint8 view (no copy) so the kernel loads plain bytes."""
    mask = key_padding_mask if key_padding_mask.stride(-1) == 1 else key_padding_mask.contiguous()
    return mask.view(torch.uint8)
