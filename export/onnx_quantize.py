"""Dynamic int8 quantisation of an exported float32 tower, checked before it is installed.

Why int8: with weights int8 per output channel and activations quantised per call, onnxruntime
runs the towers' matrix products as int8 dots (VNNI where the CPU has it), about twice the
float32 graph's speed at cosine ~0.9998 per row (benchmarks/onnx_runtime.py). Dynamic, so no
calibration data is needed; the export checks every graph on fresh inputs instead and refuses
one below `MIN_COSINE["int8"]`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from export.onnx_export import OnnxExportOptions, below_bound, describe_check, install_checked
from export.onnx_runtime import file_name
from lpi import Backbone

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _root_log_errors_only() -> Iterator[None]:
    """quantize_dynamic advises its pre-processing through the root logger on every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_tower(
    backbone: Backbone, tower: str, out_dir: Path, options: OnnxExportOptions
) -> tuple[dict | None, dict]:
    """Dynamic int8 quantisation of the installed float32 graph, checked before it is kept.

    Weights int8 per output channel, activations quantised per call (onnxruntime's
    `quantize_dynamic`: MatMul -> MatMulInteger / DynamicQuantizeMatMul, on VNNI where the
    CPU has it). Held to MIN_COSINE["int8"] per row against torch float32 on fresh inputs;
    a graph below it is refused (nothing installed, the reason in the check).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    name = file_name(tower, "int8")

    def make(temp: Path) -> None:
        quantize_dynamic(
            out_dir / file_name(tower, "float32"),
            temp,
            per_channel=True,
            weight_type=QuantType.QInt8,
        )

    with _root_log_errors_only():
        entry, check = install_checked(make, backbone, tower, out_dir, options, "int8")
    if entry is None:
        check["reason"] = below_bound(check, "int8")
        log.error("%s refused: %s", name, check["reason"])
        return None, {"kept": False, **check}
    log.info("%s: %s", name, describe_check(check))
    return entry, {"kept": True, "quantization": "dynamic, int8 weights per channel", **check}
