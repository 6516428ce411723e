"""The one entry point the backbone calls: fused Triton kernel on CUDA, PyTorch reference elsewhere.

`LPI_ATTENTION_BACKEND` overrides the choice: `auto` (default), `triton` or `reference`.
`triton` on CPU tensors means Triton's interpreter, which needs TRITON_INTERPRET=1 set before
triton is first imported. Triton is imported here lazily, only when the kernel will run.
`LPI_FP32_PRECISION` picks the kernel's float32 dots: `ieee` (default, exact) or `tf32x3`
(three TF32 products, about fp32's error, fewer registers); half precision ignores it.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import Literal

import torch
from torch import Tensor

from kernels import reference

log = logging.getLogger(__name__)

BACKEND_ENV = "LPI_ATTENTION_BACKEND"
PRECISION_ENV = "LPI_FP32_PRECISION"
Backend = Literal["triton", "reference"]
CHOICES = ("auto", "triton", "reference")


def attention_backend(device: torch.device, needs_grad: bool = False) -> Backend:
    """The backend for tensors on `device` after the env override; gradients need the reference."""
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{BACKEND_ENV}={choice!r}; expected one of {', '.join(CHOICES)}")
    if choice == "triton":
        _require_triton(device, needs_grad)
        return "triton"
    if choice == "reference" or device.type != "cuda" or needs_grad:
        return "reference"
    if not _triton_installed():
        log.warning("triton is not installed; prefix attention falls back to the reference")
        return "reference"
    return "triton"


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
    """softmax([q K_p^T, q k^T] / sqrt(d) + mask) @ [V_p; v] per row, K_p from the row's slot.

    q, k, v: [B, H, T, d]; task_slot: [B] int32 (-1 = no prefix); U_K, U_V: [S, N, R'];
    M_K, M_V: [S, R', H*d]; key_padding_mask: [B, T] bool, True = real token.
    """
    args = (q, k, v, task_slot, U_K, M_K, U_V, M_V, causal, key_padding_mask)
    if attention_backend(q.device, _needs_grad(q, k, v, U_K, M_K, U_V, M_V)) == "reference":
        return reference.prefix_attention(*args)
    from kernels import triton_prefix_attention

    precision = os.environ.get(PRECISION_ENV, "ieee") if q.dtype == torch.float32 else "ieee"
    return triton_prefix_attention.prefix_attention(*args, fp32_precision=precision)


def _require_triton(device: torch.device, needs_grad: bool) -> None:
    """A forced `triton` must be able to run: installed, no backward, interpreter on CPU."""
    if not _triton_installed():
        raise RuntimeError(f"{BACKEND_ENV}=triton but triton is not installed")
    if needs_grad:
        raise RuntimeError(
            f"{BACKEND_ENV}=triton but the fused kernel has no backward: train through "
            "kernels.attention_over_prefix (the reference), or run without gradients"
        )
    interpreting = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")
    if device.type != "cuda" and not interpreting:
        raise RuntimeError(
            f"{BACKEND_ENV}=triton with {device.type} tensors runs Triton's interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported, or use CUDA tensors"
        )


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
