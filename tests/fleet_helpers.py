"""Shared by the fleet's tests: a tiny backbone and random task artifacts, and waiting."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import lpi
from export import write_artifact
from lpi.checkpoint import save_backbone
from lpi.fold import fold_task

CONVERGE_S = 2.0  # the fleet's promise: every replica applies a change within 2 s
MIN_COSINE = 0.9999  # two replicas, same fp32 math on the same artifact


def write_files(root: Path) -> tuple[Path, list[str]]:
    """A tiny backbone and three artifacts of task prompts with random factors; versions."""
    backbone = lpi.load_backbone("tiny", seed=0)
    save_backbone(backbone, root / "backbone.safetensors")
    backbone = lpi.load_backbone(root / "backbone.safetensors")
    versions = []
    for seed in range(3):
        torch.manual_seed(seed)
        config = lpi.PromptConfig(layers=2, tokens=4, rank=3, interaction=True)
        prompts = lpi.TaskPrompts.for_backbone(config, backbone)
        with torch.no_grad():
            for parameter in prompts.parameters():
                parameter.normal_(0, 0.5)
        folded = fold_task(backbone, prompts)
        versions.append(
            write_artifact(root / f"a{seed}.safetensors", "t", folded, backbone).prompt_version
        )
    return root, versions


def wait_for(condition, timeout_s: float = CONVERGE_S, pause_s: float = 0.02) -> float:
    """Seconds until `condition()` holds; fails after `timeout_s`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"not within {timeout_s} s")
        time.sleep(pause_s)
    return time.monotonic() - started
