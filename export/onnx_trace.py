"""Tracing a tower module to an ONNX file: torch.onnx's TorchScript or dynamo exporter.

Both give the graph dynamic B (and T for text); which exporter makes which graph, and why, is
export.onnx_export's docstring. onnx and onnxscript load only when an export runs.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from export.onnx_runtime import INPUTS, OUTPUT


def trace(
    module: nn.Module,
    tower: str,
    example: dict,
    path: Path,
    opset: int,
    context: int,
    exporter: str = "dynamo",
) -> None:
    """torch.onnx's dynamo or TorchScript exporter with dynamic B (and T for text) to `path`."""
    if exporter == "torchscript":
        return _trace_torchscript(module, tower, example, path, opset)
    batch = torch.export.Dim("batch", min=1)
    first = {0: batch}  # pixels [B, 3, S, S]; token_ids [B, T]
    if tower == "text":
        first[1] = torch.export.Dim("length", min=1, max=context)
    # In INPUTS order: the exporter names the graph's axes by position, not by key.
    dims = dict(zip(INPUTS[tower], (first, {1: batch}, {1: batch}, {0: batch}), strict=True))
    with warnings.catch_warnings(), _quiet("onnx_ir", "onnxscript"):
        # The same batch dimension on four inputs makes the exporter note that it merged them.
        warnings.filterwarnings("ignore", message=r".*axis name.*", category=UserWarning)
        program = torch.onnx.export(
            module,
            tuple(example[name] for name in INPUTS[tower]),
            dynamo=True,
            opset_version=opset,
            input_names=list(INPUTS[tower]),
            output_names=[OUTPUT],
            dynamic_shapes=dims,
            verbose=False,
        )
        assert program is not None  # the dynamo exporter always returns its program
        program.save(str(path), external_data=False)


def _trace_torchscript(
    module: nn.Module, tower: str, example: dict, path: Path, opset: int
) -> None:
    axes = {name: {0: "batch"} for name in (INPUTS[tower][0], "prefix_active")}
    axes |= {name: {1: "batch"} for name in ("prefix_keys", "prefix_values")}
    if tower == "text":
        axes[INPUTS[tower][0]][1] = "length"
    with warnings.catch_warnings():
        # Shape checks in Python (Prefix, the mask) trace as constants: the checks at other
        # batch sizes and lengths, below, are what prove the graph general.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(example[name] for name in INPUTS[tower]),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(INPUTS[tower]),
            output_names=[OUTPUT],
            dynamic_axes=axes,
        )


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """The exporter's graph passes log every rewrite at INFO; keep their warnings only."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
