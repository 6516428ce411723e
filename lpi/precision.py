"""Serving precision: which float type the frozen backbone computes in, and the cast to it.

Why: a CPU with AVX512-BF16 or AMX multiplies bf16 matrices about four times faster than
float32 (benchmarks/backbone.py measures it), and a GPU's tensor cores likewise; the frozen
backbone loses almost nothing by it (cosine >= 0.999 per row against float32, tested in
tests/test_dtype.py). Weights are cast once (autocast re-casts them on every call and was
slower than float32 on the CPU); inputs stay float32 and vectors come back float32.

`resolve_dtype` turns a name (`auto`, `float32`, `float16`, `bfloat16`) into a dtype the
device can run, with the reason for it; asked for a type the hardware lacks it falls back to
float32 and says so (the server logs the reason and shows it on /readyz).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from lpi.backbone import Backbone

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
CHOICES = ("auto", *DTYPES)
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 dot products
CPU_FP16_FLAGS = ("avx512_fp16", "amx_fp16")
# `auto` keeps narrower towers in float32 on a CPU: a width-64 tower's forward pass is per-op
# overhead, and bf16 measured 0.4-1.1x float32 there (benchmarks/backbone.py, the demo's tiny
# backbone), while ViT-B (width 768) gained 2.7-3.9x. bf16 also makes oneDNN keep a kernel per
# input shape, so the server's varied text lengths cost memory for no gain on a tiny model.
CPU_BF16_MIN_WIDTH = 256


@dataclass(frozen=True)
class Precision:
    """The dtype a backbone serves in, what was asked for, and why this one."""

    dtype: torch.dtype
    requested: str
    reason: str

    @property
    def name(self) -> str:
        return NAMES[self.dtype]

    @property
    def fell_back(self) -> bool:
        return self.requested not in ("auto", self.name)


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not there: not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def supports(dtype: torch.dtype, device: torch.device, flags: frozenset[str] | None = None) -> bool:
    """Whether `device` computes in `dtype` natively (fast, not emulated)."""
    if dtype == torch.float32:
        return True
    if device.type == "cuda":
        if dtype == torch.bfloat16:
            return bool(torch.cuda.is_bf16_supported())
        return True  # every CUDA GPU torch supports has fp16 arithmetic
    if device.type != "cpu":
        return False
    flags = cpu_flags() if flags is None else flags
    wanted = CPU_BF16_FLAGS if dtype == torch.bfloat16 else CPU_FP16_FLAGS
    return any(flag in flags for flag in wanted)


def resolve_dtype(
    name: str,
    device: torch.device | str,
    flags: frozenset[str] | None = None,
    width: int | None = None,
) -> Precision:
    """`auto`: bfloat16 where the device has it natively (on a CPU, for towers at least
    `CPU_BF16_MIN_WIDTH` wide, `width` being the widest), float32 elsewhere. A named dtype the
    device lacks falls back to float32 (emulated half precision is slower than float32)."""
    if name not in CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(CHOICES)}, got {name!r}")
    device = torch.device(device)
    where = "CUDA" if device.type == "cuda" else f"this {device.type.upper()}"
    if name == "auto":
        narrow = device.type == "cpu" and width is not None and width < CPU_BF16_MIN_WIDTH
        if narrow and supports(torch.bfloat16, device, flags):
            return Precision(
                torch.float32,
                name,
                f"auto: towers {width} wide gain nothing from bfloat16 on {where} "
                f"(bfloat16 from width {CPU_BF16_MIN_WIDTH})",
            )
        if supports(torch.bfloat16, device, flags):
            return Precision(torch.bfloat16, name, f"auto: {where} has native bfloat16")
        return Precision(torch.float32, name, f"auto: {where} has no native bfloat16")
    dtype = DTYPES[name]
    if supports(dtype, device, flags):
        return Precision(dtype, name, f"{name} as asked")
    needs = " or ".join(CPU_BF16_FLAGS if dtype == torch.bfloat16 else CPU_FP16_FLAGS)
    reason = (
        f"{name} asked for, but {where} has no native {name} ({needs} not in its flags): "
        "serving float32"
    )
    return Precision(torch.float32, name, reason)


def cast_backbone(model: Backbone, dtype: torch.dtype) -> Backbone:
    """Cast every weight to `dtype` in place, once; the float32 fingerprint stays the model's.

    The fingerprint names the weights the vectors come from: a cast backbone serves the same
    vectors to ~1e-3, so tasks exported against the float32 weights still fit it.
    """
    if dtype not in NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    current = next(model.parameters()).dtype
    if current == dtype:
        return model
    if current == torch.float32 and model.float32_fingerprint is None:
        from lpi.checkpoint import fingerprint  # the one place that hashes weights

        model.float32_fingerprint = fingerprint(model)
    return model.to(dtype)


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
