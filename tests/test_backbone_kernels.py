"""The backbone's serving path (task slots into a pool, through the kernels' dispatch) against
its training path (materialised prefixes from the prompts), on a batch that mixes tasks.

Tolerance 1e-5 on unit-norm fp32 features: the folded factors reproduce the prefix to ~1e-7
relative after the float64 -> float32 cast, and the kernel differs from SDPA by summation order.
"""

from __future__ import annotations

import pytest
import torch

import lpi
from kernels import TaskSlotPool
from tests.conftest import CAPTIONS, random_pixels, random_prompts

TOLERANCE = 1e-5
ROWS = ["b", None, "a", "c"]


def _pool(folded: dict, tower: str, width: int) -> TaskSlotPool:
    towers = {name: getattr(task, tower) for name, task in folded.items()}
    first = next(iter(towers.values()))
    pool = TaskSlotPool(
        layers=first.key_u.shape[0],
        slots=8,
        tokens=first.key_u.shape[1],
        rank=max(t.rank for t in towers.values()),
        width=width,
    )
    for name, factors in towers.items():
        f32 = factors.to(torch.float32)
        pool.add(name, f32.key_u, f32.key_m, f32.value_u, f32.value_m)
    return pool


@pytest.fixture(scope="module")
def tasks(tiny_backbone):
    bank = lpi.PromptBank()
    for seed, name in enumerate("abc"):
        bank.add(name, random_prompts(tiny_backbone, seed=20 + seed, interaction=name != "b"))
    folded = {name: lpi.fold_task(tiny_backbone, bank.tasks[name]) for name in bank.names()}
    cfg = tiny_backbone.config
    pools = (_pool(folded, "image", cfg.vision.width), _pool(folded, "text", cfg.text.width))
    return bank, pools


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_slot_path_equals_materialised_path(tiny_backbone, tasks, generator, backend, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("LPI_ATTENTION_BACKEND", backend)
    bank, (image_pool, text_pool) = tasks
    pixels = random_pixels(tiny_backbone, len(ROWS), generator)
    tokens = lpi.tokenize(CAPTIONS)
    with torch.no_grad():
        image_prefix, text_prefix = bank.prefixes(tiny_backbone, ROWS)
        expected_image = tiny_backbone.encode_image(pixels, image_prefix)
        expected_text = tiny_backbone.encode_text(tokens, text_prefix)
        with image_pool.lease(ROWS) as image_slots, text_pool.lease(ROWS) as text_slots:
            image = tiny_backbone.encode_image(pixels, lpi.SlotPrefix(image_slots, image_pool))
            text = tiny_backbone.encode_text(tokens, lpi.SlotPrefix(text_slots, text_pool))
    assert (image - expected_image).abs().max() <= TOLERANCE
    assert (text - expected_text).abs().max() <= TOLERANCE
    # The row without a task is the frozen backbone.
    bare = tiny_backbone.encode_image(pixels[1:2])
    assert (image[1] - bare[0]).abs().max() <= TOLERANCE


def test_slot_prefix_of_the_wrong_tower_is_refused(tiny_backbone, tasks, generator):
    _, (image_pool, _) = tasks
    with image_pool.lease(["a", "b"]) as slots, pytest.raises(ValueError, match="batch"):
        tiny_backbone.encode_image(
            random_pixels(tiny_backbone, 3, generator), lpi.SlotPrefix(slots, image_pool)
        )
