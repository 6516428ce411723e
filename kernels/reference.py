"""Plain PyTorch prefix attention: the slow twin of the fused kernel (METHOD.md §3, §7).

Each row b attends over its task's prefix keys followed by its own tokens:

    out[b] = softmax([q K_p^T , q k^T] / sqrt(d) + mask) @ [V_p ; v]

with K_p = U_K[slot] @ M_K[slot] split into heads (V_p likewise). The prefix is always visible;
the causal mask and the key padding apply among the tokens only. Slot -1 means no prefix.

Dimensions: B rows, H heads, T tokens, d head size, N prefix tokens, R the pool's padded rank
R', S pool slots. Training calls `attention_with_prefix` (differentiable, prefixes already
materialised); serving calls `prefix_attention` with pool slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
    """Gather each row's factors, materialise K_p and V_p, and run SDPA over [prefix; tokens]."""
    check_prefix_inputs(q, k, v, task_slot, U_K, M_K, U_V, M_V, key_padding_mask)
    check_slots(task_slot, U_K.shape[0])
    heads = q.shape[1]
    index = task_slot.clamp(min=0).long()  # [B]; rows with slot -1 are masked out below
    prefix_k = materialise_prefix(U_K, M_K, index, heads)  # [B, H, N, d]
    prefix_v = materialise_prefix(U_V, M_V, index, heads)
    return attention_with_prefix(
        q, k, v, prefix_k, prefix_v, task_slot >= 0, causal, key_padding_mask
    )


def check_slots(task_slot: Tensor, slots: int) -> None:
    """Every slot in [-1, S): a host read (one sync on a GPU), so only the slow path pays it."""
    if task_slot.numel() == 0:
        return
    low, high = int(task_slot.min()), int(task_slot.max())
    if low < -1 or high >= slots:
        raise ValueError(
            f"task_slot holds slots {low}..{high}; slots must lie in [-1, {slots}) (-1 = none)"
        )


def materialise_prefix(U: Tensor, M: Tensor, index: Tensor, heads: int) -> Tensor:
    """K_p = U @ M for each row's slot, split into heads: [S, N, R], [S, R, H*d] -> [B, H, N, d]."""
    prefix = torch.bmm(U[index], M[index])  # [B, N, H*d]
    rows, tokens, width = prefix.shape
    return prefix.view(rows, tokens, heads, width // heads).transpose(1, 2)


def attention_with_prefix(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
    prefix_active: Tensor | None = None,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Attention of q over [prefix_k; k] with materialised per-row prefixes; differentiable.

    prefix_k, prefix_v: [B, H, N, d] or None (no prefix at all); prefix_active: [B] bool, False
    hides a row's prefix (None: every row active); key_padding_mask: [B, T] bool, True = real.
    A query that can see no key at all gets zeros rather than NaN.
    """
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v must be given together")
    rows, _, tokens, _ = q.shape
    prefix_len = 0 if prefix_k is None else prefix_k.shape[2]
    mask = visibility_mask(
        rows, tokens, prefix_len, prefix_active, causal, key_padding_mask, q.device
    )
    out = attention_over_prefix(q, k, v, prefix_k, prefix_v, mask, causal)
    if key_padding_mask is None:
        return out  # every query sees at least itself (or the prefix)
    assert mask is not None  # a padding mask always gives one
    # Zeros for queries that see no key: not every SDPA backend guarantees them (CPU does).
    return out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)


def attention_over_prefix(
    q: Tensor,  # [B, H, T, d]
    k: Tensor,  # [B, H, T, d]
    v: Tensor,  # [B, H, T, d]
    prefix_k: Tensor | None,  # [B, H, N, d]
    prefix_v: Tensor | None,  # [B, H, N, d]
    mask: Tensor | None,  # from visibility_mask, built once and shared by a model's layers
    causal: bool,
) -> Tensor:  # [B, H, T, d]
    """SDPA over [prefix; tokens] with a prebuilt mask; SDPA's own causal path when no mask."""
    if prefix_k is not None:
        if prefix_v is None:
            raise ValueError("prefix_k is given without prefix_v: pass both or neither")
        k = torch.cat([prefix_k, k], dim=2)  # [B, H, N + T, d]
        v = torch.cat([prefix_v, v], dim=2)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and prefix_k is None)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def visibility_mask(
    rows: int,
    tokens: int,
    prefix_len: int,
    prefix_active: Tensor | None,
    causal: bool,
    key_padding_mask: Tensor | None,
    device: torch.device,
) -> Tensor | None:
    """Boolean mask [B or 1, 1, T, N + T] (True = may attend), or None when SDPA needs none.

    None means: every key visible, or (no prefix, causal, no padding) SDPA's causal path.
    """
    if prefix_active is None and key_padding_mask is None and (not causal or prefix_len == 0):
        return None
    columns = torch.arange(prefix_len + tokens, device=device)  # N prefix rows, then T tokens
    if causal:  # token i sees every prefix row and tokens 0..i
        allowed = columns <= torch.arange(tokens, device=device)[:, None] + prefix_len
    else:
        allowed = torch.ones(tokens, prefix_len + tokens, dtype=torch.bool, device=device)
    allowed = allowed[None, None]  # [1, 1, T, N + T]
    if key_padding_mask is not None:
        real = torch.ones(rows, prefix_len + tokens, dtype=torch.bool, device=device)
        real[:, prefix_len:] = key_padding_mask.to(device=device, dtype=torch.bool)
        allowed = allowed & real[:, None, None, :]
    if prefix_active is not None and prefix_len:
        active = prefix_active.to(device=device, dtype=torch.bool)
        allowed = allowed & ((columns >= prefix_len) | active.view(-1, 1, 1, 1))
    return allowed


def check_prefix_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    task_slot: Tensor,
    U_K: Tensor,
    M_K: Tensor,
    U_V: Tensor,
    M_V: Tensor,
    key_padding_mask: Tensor | None,
) -> None:
    """Refuse mismatched shapes, dtypes and devices with a message naming the argument."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one [B, H, T, d] shape; got {_shapes(q=q, k=k, v=v)}")
    rows, heads, tokens, head_dim = q.shape
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q dtype must be one of {FLOAT_DTYPES}, got {q.dtype}")
    named = {"k": k, "v": v, "U_K": U_K, "M_K": M_K, "U_V": U_V, "M_V": M_V}
    for name, tensor in named.items():
        if tensor.dtype != q.dtype:
            raise ValueError(f"{name} dtype {tensor.dtype} differs from q dtype {q.dtype}")
        if tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device}, q on {q.device}")
    if task_slot.shape != (rows,) or task_slot.dtype != torch.int32:
        raise ValueError(
            f"task_slot must be int32 [B={rows}], got {task_slot.dtype} {tuple(task_slot.shape)}"
        )
    if task_slot.device != q.device:
        raise ValueError(f"task_slot is on {task_slot.device}, q on {q.device}")
    _check_pool(U_K, M_K, U_V, M_V, heads * head_dim)
    if key_padding_mask is not None and (
        key_padding_mask.shape != (rows, tokens) or key_padding_mask.dtype != torch.bool
    ):
        raise ValueError(
            f"key_padding_mask must be bool [B={rows}, T={tokens}], "
            f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )
    if key_padding_mask is not None and key_padding_mask.device != q.device:
        raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")


def _check_pool(U_K: Tensor, M_K: Tensor, U_V: Tensor, M_V: Tensor, width: int) -> None:
    """U_K, U_V: [S, N, R]; M_K, M_V: [S, R, H*d]."""
    if U_K.dim() != 3 or U_V.shape != U_K.shape:
        raise ValueError(
            f"U_K, U_V must share one [S, N, R'] shape; got {_shapes(U_K=U_K, U_V=U_V)}"
        )
    slots, _, rank = U_K.shape
    if slots < 1:
        raise ValueError("the pool needs at least one slot (S >= 1), even if every row has -1")
    expected = (slots, rank, width)
    if M_K.shape != expected or M_V.shape != expected:
        raise ValueError(
            f"M_K, M_V must be [S, R', H*d] = {expected}; got {_shapes(M_K=M_K, M_V=M_V)}"
        )


def _shapes(**tensors: Tensor) -> str:
    return ", ".join(f"{name} {tuple(t.shape)}" for name, t in tensors.items())
