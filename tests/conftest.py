"""Shared fixtures: tiny models built here from seeds; nothing is downloaded."""

from __future__ import annotations

import importlib.util
import os

import torch

# Triton reads TRITON_INTERPRET once, at its first import, and some test dependencies (open_clip
# via timm) import it early: set it before any test module loads, so the kernel tests run on
# the CPU interpreter whatever the test order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Servers built by tests (Settings, `python -m server` subprocesses) compute in float32, so
# their vectors meet the float32 tolerances of the suite whatever the CPU; the bf16 / fp16
# paths are tested against them explicitly (tests/test_dtype.py).
os.environ.setdefault("LPI_DTYPE", "float32")
# In-process apps would otherwise set torch's (process-wide) thread count to the cores less one;
# training that must reproduce the session's fixtures bit for bit needs the count they had.
os.environ.setdefault("LPI_THREADS", str(torch.get_num_threads()))

import pytest

import lpi

# `portal` and `connect`: the SDK twins over an in-process app (tests/client_twins.py);
# `artifacts`, `backbone`, `app_settings`: the in-process app tests' (tests/app_fixtures.py).
pytest_plugins = ["tests.client_twins", "tests.app_fixtures"]

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


# The test suite's tiny bundle: export.bundle's default recipe with an LPI and a dense run.
TINY_RECIPE = dict(methods=("lpi", "dense"), export=False)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """A small synthetic dataset, a tiny backbone, and short LPI and dense runs on it.

    Built by `export.bundle.build_bundle` (the builder of the demo and the soak benchmark),
    which trains for real through the API `python -m lpi.train` calls (1 epoch, 2 tasks), so
    export and evaluation tests read exactly what users' runs write. Layout: data/,
    backbone.safetensors, lpi/, dense/.
    """
    from export.bundle import BundleRecipe, build_bundle

    root = tmp_path_factory.mktemp("tiny-runs")
    build_bundle(BundleRecipe(**TINY_RECIPE), root)
    return root


@pytest.fixture(scope="session")
def fused():
    """The kernel module, imported under the interpreter (skip if triton came in without it)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from triton.runtime.interpreter import InterpretedFunction

    from kernels import triton_prefix_attention

    if not isinstance(triton_prefix_attention._prefix_attention_kernel, InterpretedFunction):
        pytest.skip("kernels.triton_prefix_attention was imported before TRITON_INTERPRET=1")
    return triton_prefix_attention
