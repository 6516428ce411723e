"""Shared fixtures: tiny models built here from seeds; nothing is downloaded."""

from __future__ import annotations

import os

import torch

# Triton reads TRITON_INTERPRET once, at its first import, and some test dependencies (open_clip
# via timm) import it early: set it before any test module loads, so the kernel tests run on
# the CPU interpreter whatever the test order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import lpi

# Captions with different lengths, so text batches are ragged and EOT positions differ.
CAPTIONS = [
    "a red square on a white background",
    "two small blue circles",
    "a large green triangle next to a yellow star in the top left corner of the picture",
    "stripes",
]


@pytest.fixture(scope="session")
def tiny_backbone() -> lpi.Backbone:
    return lpi.load_backbone("tiny", seed=0)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def random_pixels(backbone: lpi.Backbone, batch: int, generator: torch.Generator) -> torch.Tensor:
    size = backbone.config.vision.image_size
    return torch.randn(batch, 3, size, size, generator=generator)


def random_prompts(
    backbone: lpi.Backbone, seed: int, interaction: bool = True, layers: int = 3, tokens: int = 4
) -> lpi.TaskPrompts:
    """Task prompts with every factor random (interaction and LN parameters too)."""
    torch.manual_seed(seed)
    config = lpi.PromptConfig(layers=layers, tokens=tokens, rank=3, interaction=interaction)
    prompts = lpi.TaskPrompts.for_backbone(config, backbone)
    if prompts.interaction is not None:
        with torch.no_grad():
            for ln in (prompts.interaction.ln_v, prompts.interaction.ln_t):
                ln.weight.normal_(1.0, 0.2)
                ln.bias.normal_(0.0, 0.2)
    return prompts


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """A small synthetic dataset, a tiny backbone, and short LPI and dense runs on it.

    Trained for real by `python -m lpi.train` (1 epoch, 2 tasks), so export and evaluation
    tests read exactly what users' runs write.
    """
    from lpi.checkpoint import save_backbone
    from lpi.continual.data import synthetic
    from lpi.train import main as train_main

    root = tmp_path_factory.mktemp("tiny-runs")
    synthetic.main([
        "--out", str(root / "data"), "--tasks", "2", "--train-per-task", "24",
        "--test-per-task", "12", "--pretrain", "16", "--image-size", "32",
    ])  # fmt: skip
    backbone = save_backbone(lpi.load_backbone("tiny", seed=3), root / "backbone.safetensors")
    for method in ("lpi", "dense"):
        code = train_main([
            "--manifest", str(root / "data" / "manifest.jsonl"), "--backbone", str(backbone),
            "--out", str(root / method), "--method", method, "--layers", "2", "--tokens", "4",
            "--epochs", "1", "--batch-size", "8", "--cache",
        ])  # fmt: skip
        assert code == 0
    return root
