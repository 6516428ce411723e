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
