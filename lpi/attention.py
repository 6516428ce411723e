"""Multi-head self-attention with an optional per-row key/value prefix (spec section 3).

    out = softmax([q K_p^T, q k^T] / sqrt(d) + mask) @ [V_p; v]

Prefix rows are visible to every real token; the causal mask (text) applies among real tokens
only; rows whose `active` flag is False see no prefix at all. Dimensions: B rows, H heads,
T tokens, N prefix rows, d head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def split_heads(x: Tensor, heads: int) -> Tensor:
    batch, length, width = x.shape  # [B, T, D]
    return x.view(batch, length, heads, width // heads).transpose(1, 2)  # [B, H, T, d]


def merge_heads(x: Tensor) -> Tensor:
    batch, heads, length, head_dim = x.shape  # [B, H, T, d]
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


def prefix_mask(
    tokens: int, prefix: int, active: Tensor | None, causal: bool, device: torch.device
) -> Tensor | None:
    """Boolean mask [B or 1, 1, T, N + T], True where attention is allowed; None if all is.

    Built once per forward pass and shared by every prompted layer.
    """
    if not causal and active is None:
        return None
    columns = torch.arange(prefix + tokens, device=device)  # keys: N prefix rows, then T tokens
    if causal:  # token i sees every prefix row and tokens 0..i
        allowed = columns <= torch.arange(tokens, device=device)[:, None] + prefix  # [T, N+T]
    else:
        allowed = torch.ones(tokens, prefix + tokens, dtype=torch.bool, device=device)
    if active is None:
        return allowed[None, None]
    sees_prefix = (columns >= prefix) | active.view(-1, 1, 1, 1)  # [B, 1, 1, N+T]
    return allowed & sees_prefix


def attention_with_prefix(
    q: Tensor,  # [B, H, T, d]
    k: Tensor,  # [B, H, T, d]
    v: Tensor,  # [B, H, T, d]
    prefix_k: Tensor | None,  # [B, H, N, d]
    prefix_v: Tensor | None,  # [B, H, N, d]
    mask: Tensor | None,  # from prefix_mask
    causal: bool,
) -> Tensor:  # [B, H, T, d]
    """Softmax attention over the prefix rows and then the real tokens, in one SDPA call."""
    if prefix_k is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    keys = torch.cat([prefix_k, k], dim=2)  # [B, H, N + T, d]
    values = torch.cat([prefix_v, v], dim=2)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
