"""Fused prefix attention in Triton: task prefixes rebuilt on chip (spec LPI.md section 7).

    out[b] = softmax([q K_p^T , q k^T] / sqrt(d) + mask) @ [V_p ; v],   K_p = U_K[slot] @ M_K[slot]

One program per (query block, row, head). The row's slot selects its factors; each prefix tile
is rebuilt in registers (K_p^T tile = M^T tile @ U^T tile) and never touches global memory; an
online softmax (FlashAttention) runs over the prefix, then over the token blocks. The prefix is
always visible; causal and key-padding masks apply among tokens; slot -1 skips the prefix.

Dimensions: B rows, H heads, T tokens, d head size, N prefix tokens, R the pool's padded rank
R', S pool slots. This module imports triton at the top: only `kernels.dispatch` imports it,
and only when a GPU (or the interpreter, TRITON_INTERPRET=1) will run it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.reference import check_prefix_inputs

LOG2_E = 1.4426950408889634
# tl.dot needs every block dimension >= 16 for fp16/bf16 on NVIDIA GPUs (>= 8 for fp32): rank,
# prefix length and head size are padded up to this by masked loads.
MIN_DOT = 16
MAX_TOKEN_BLOCK = 64


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    """a @ b, fp32 accumulation; DOT_FP32 upcasts first (the interpreter's bf16 dot is wrong)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _softmax_step(acc, m_i, l_i, s, v, DOT_FP32: tl.constexpr):
    """Online-softmax update with scores s [BLOCK_M, K] (log2 units, -inf = hidden), v [K, D]."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
    return acc, m_new, l_i


@triton.jit
def _prefix_attention_kernel(
    Q, K, V, Out, Slot, UK, MK, UV, MV, KeyMask,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_us, stride_un,
    stride_ms, stride_mr,
    stride_maskb,
    H, T, N, R, HEAD_DIM, qk_scale,
    CAUSAL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    dtype = Q.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < T) & d_ok[None, :], other=0.0)  # [BLOCK_M, D]

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Prefix: this head's columns of M, then K_p / V_p tiles rebuilt from U tiles on chip.
    slot = tl.load(Slot + b)
    n_prefix = tl.where(slot >= 0, N, 0)  # slot -1: the loop below runs zero times
    slot = tl.maximum(slot, 0)
    m_cols = slot * stride_ms + h * HEAD_DIM
    r_ok = offs_r < R  # padded rank columns load as zeros and add nothing to U @ M
    mk_ptrs = MK + m_cols + offs_r[None, :] * stride_mr + offs_d[:, None]
    mk_t = tl.load(mk_ptrs, mask=d_ok[:, None] & r_ok[None, :], other=0.0)  # [D, BLOCK_R]
    mv_ptrs = MV + m_cols + offs_r[:, None] * stride_mr + offs_d[None, :]
    mv = tl.load(mv_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_R, D]
    for p0 in range(0, n_prefix, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < N
        uk_ptrs = UK + slot * stride_us + offs_p[None, :] * stride_un + offs_r[:, None]
        uk_t = tl.load(uk_ptrs, mask=r_ok[:, None] & p_ok[None, :], other=0.0)  # [BLOCK_R, P]
        kp_t = _dot(mk_t, uk_t, DOT_FP32).to(dtype)  # [D, BLOCK_P] = (U_K @ M_K)^T tile
        s = _dot(q, kp_t, DOT_FP32) * qk_scale  # [BLOCK_M, BLOCK_P]
        s = tl.where(p_ok[None, :], s, float("-inf"))
        uv_ptrs = UV + slot * stride_us + offs_p[:, None] * stride_un + offs_r[None, :]
        uv = tl.load(uv_ptrs, mask=p_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_P, R]
        vp = _dot(uv, mv, DOT_FP32).to(dtype)  # [BLOCK_P, D] = U_V @ M_V tile
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, vp, DOT_FP32)

    # Tokens: causal programs stop at their last query; padded keys get no weight.
    hi = T
    if CAUSAL:
        hi = tl.minimum(T, (pid_m + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T
        k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kt + offs_d[:, None]
        k_t = tl.load(k_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [D, BLOCK_N]
        s = _dot(q, k_t, DOT_FP32) * qk_scale  # [BLOCK_M, BLOCK_N]
        visible = n_ok[None, :]
        if HAS_KEY_MASK:
            real = tl.load(KeyMask + b * stride_maskb + offs_n, mask=n_ok, other=0)
            visible = visible & (real != 0)[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(visible, s, float("-inf"))
        v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
        v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, D]
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, DOT_FP32)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a query that saw no key gets zeros
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(dtype), mask=(offs_m[:, None] < T) & d_ok[None, :])


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
) -> Tensor:
    """Fused twin of `kernels.reference.prefix_attention`; returns [B, H, T, d] in q's dtype.

    Slots are trusted (the pool hands them out): a slot >= S reads out of bounds.
    """
    check_prefix_inputs(q, k, v, task_slot, U_K, M_K, U_V, M_V, key_padding_mask)
    _check_layout(q=q, k=k, v=v, task_slot=task_slot)
    _check_layout(U_K=U_K, M_K=M_K, U_V=U_V, M_V=M_V, contiguous=True)
    rows, heads, tokens, head_dim = q.shape
    _, prefix_len, rank = U_K.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [B, H, T, d]
    key_mask = task_slot if key_padding_mask is None else _as_bytes(key_padding_mask)
    blocks = block_sizes(tokens, prefix_len, rank, head_dim)
    grid = (triton.cdiv(tokens, blocks["BLOCK_M"]), rows * heads)
    _prefix_attention_kernel[grid](
        q, k, v, out, task_slot, U_K, M_K, U_V, M_V, key_mask,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *U_K.stride()[:2], *M_K.stride()[:2], key_mask.stride(0),
        heads, tokens, prefix_len, rank, head_dim, head_dim**-0.5 * LOG2_E,
        CAUSAL=causal,
        HAS_KEY_MASK=key_padding_mask is not None,
        DOT_FP32=not q.is_cuda and q.dtype == torch.bfloat16,
        num_warps=8 if q.dtype == torch.float32 else 4,  # fp32 ieee dots spill at 4 warps
        **blocks,
    )  # fmt: skip
    return out


def block_sizes(tokens: int, prefix_len: int, rank: int, head_dim: int) -> dict[str, int]:
    """Power-of-two tiles, each at least MIN_DOT so every tl.dot is legal on a GPU."""
    token_block = min(MAX_TOKEN_BLOCK, _pow2(tokens))
    return {
        "BLOCK_M": token_block,
        "BLOCK_N": token_block,
        "BLOCK_P": min(MAX_TOKEN_BLOCK, _pow2(prefix_len)),
        "BLOCK_R": _pow2(rank),
        "BLOCK_D": _pow2(head_dim),
    }


def _pow2(size: int) -> int:
    return max(MIN_DOT, triton.next_power_of_2(size))


def _check_layout(contiguous: bool = False, **tensors: Tensor) -> None:
    """The kernel indexes the last dimension with stride 1; the pool must be fully contiguous."""
    for name, tensor in tensors.items():
        ok = tensor.is_contiguous() if contiguous else tensor.stride(-1) == 1
        if not ok:
            need = "contiguous" if contiguous else "stride 1 in its last dimension"
            raise ValueError(f"{name} must be {need}; got strides {tensor.stride()}")


def _as_bytes(key_padding_mask: Tensor) -> Tensor:
    """[B, T] bool -> uint8 view (no copy) so the kernel loads plain bytes."""
    mask = key_padding_mask if key_padding_mask.stride(-1) == 1 else key_padding_mask.contiguous()
    return mask.view(torch.uint8)
