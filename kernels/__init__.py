"""Prefix attention for task prompts: the fused kernel's dispatch, its reference, the slot pool.

The floor of the import graph: tensors in, tensors out, nothing from lpi, export or server.
Triton is imported only inside `kernels.dispatch.prefix_attention`, when the kernel runs.
"""

from kernels.dispatch import BACKEND_ENV, attention_backend, prefix_attention
from kernels.pool import NotInPoolError, PoolFullError, TaskSlotPool
from kernels.reference import attention_over_prefix, attention_with_prefix, visibility_mask
from kernels.reference import prefix_attention as reference_prefix_attention

__all__ = [
    "BACKEND_ENV",
    "NotInPoolError",
    "PoolFullError",
    "TaskSlotPool",
    "attention_backend",
    "attention_over_prefix",
    "attention_with_prefix",
    "prefix_attention",
    "reference_prefix_attention",
    "visibility_mask",
]
