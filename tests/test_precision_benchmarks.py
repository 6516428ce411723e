"""The precision benchmarks' own logic, in miniature (their figures live in the README).

benchmarks/demo_recall.py must measure recall on a gallery that starts with the demo bundle's
own test items, and score a path against torch float32 by the points it moves;
benchmarks/serving_prompt.py pairs each prompted cell with its own round's bare time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from server.demo import DemoSizes, ensure_demo_bundle

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# A bundle of a few seconds: the default recipe at a fraction of its sizes.
TEST_SIZES = DemoSizes(
    pretrain_images=64,
    pretrain_epochs=1,
    train_per_task=16,
    test_per_task=6,
    task_epochs=1,
    layers=2,
    tokens=4,
    batch_size=8,
)
TASKS = 2


@pytest.fixture
def benchmarks(monkeypatch):
    """The scripts import `benchkit` from their own folder, as when run as files."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import benchkit
    import demo_recall
    import serving_prompt

    return demo_recall, serving_prompt, benchkit


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "bundle"
    return ensure_demo_bundle(root, tasks=TASKS, progress=False, sizes=TEST_SIZES)


def test_gallery_starts_with_the_bundles_own_items(benchmarks, bundle):
    demo_recall, _, _ = benchmarks
    count = TEST_SIZES.test_per_task + 9
    galleries = demo_recall.galleries(bundle, TEST_SIZES, count)
    assert list(galleries) == list(bundle.items)
    for task, (images, captions) in galleries.items():
        items = bundle.items[task]
        assert len(images) == len(captions) == count
        assert len(set(captions)) == count  # one caption per image, none repeated
        assert captions[: len(items)] == [item.caption for item in items]
        for image, item in zip(images, items, strict=False):  # the PNGs the bundle wrote
            stored = np.asarray(Image.open(item.image).convert("RGB"))
            assert np.array_equal(np.asarray(image), stored)


def test_gallery_refuses_another_recipe_or_fewer_items(benchmarks, bundle):
    demo_recall, _, _ = benchmarks
    with pytest.raises(SystemExit, match="test-items"):
        demo_recall.galleries(bundle, TEST_SIZES, TEST_SIZES.test_per_task - 1)
    other_seed = dataclasses.replace(TEST_SIZES, seed=TEST_SIZES.seed + 1)
    with pytest.raises(SystemExit, match="does not start with the bundle's"):
        demo_recall.galleries(bundle, other_seed, TEST_SIZES.test_per_task)


def test_summary_scores_each_path_against_float32(benchmarks):
    demo_recall, _, _ = benchmarks
    generator = torch.Generator().manual_seed(7)
    rows = 40
    image = F.normalize(torch.randn(rows, 16, generator=generator), dim=-1)
    text = F.normalize(image + 0.3 * torch.randn(rows, 16, generator=generator), dim=-1)
    shuffled = text[torch.randperm(rows, generator=generator)]  # matches nothing: recall falls
    results = {
        "torch float32": {"t": {"image": image, "text": text}},
        "torch bfloat16": {"t": {"image": image.clone(), "text": text.clone()}},
        "onnx int8": {"t": {"image": image, "text": shuffled}},
    }
    summary = {row["path"]: row for row in demo_recall.summarise(results)}
    same = summary["torch bfloat16"]
    assert same["d_i2t_r10"] == same["d_t2i_r10"] == 0 and same["goal"] == "met"
    assert same["min_cosine"] == pytest.approx(1.0, abs=1e-6)
    moved = summary["onnx int8"]
    reference = summary["torch float32"]
    assert moved["d_i2t_r10"] == moved["i2t_r10"] - reference["i2t_r10"] < -1
    assert moved["goal"] == "NOT met" and moved["items"] == rows


def test_prompt_overhead_pairs_each_round_with_its_own_bare_time(benchmarks):
    _, serving_prompt, benchkit = benchmarks
    # Round 3's burst slows both cells, round 4's the prompted one alone: paired, 1.1 holds.
    bare, prompted = [1.0, 1.0, 3.0, 1.0, 1.0], [1.1, 1.1, 3.3, 2.2, 1.1]
    assert benchkit.paired_ratio(prompted, bare) == pytest.approx(1.1)
    calls = []
    samples = benchkit.time_rounds(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, 0.0
    )
    assert {name: len(times) for name, times in samples.items()} == {"a": 3, "b": 3}
    assert calls[4:] == ["a", "b"] * 3  # two warm-up calls each, then rounds in order
    keys = [("t0", "v"), ("t1", "v")]
    modes = serving_prompt.row_keys(keys, 4)
    assert modes["bare"] == [None] * 4 and modes["one task"] == [keys[0]] * 4
    assert modes["8 tasks"] == [keys[0], keys[1], keys[0], keys[1]]
    assert modes["half bare"] == [keys[0], None, keys[0], None]
    assert list(serving_prompt.row_keys(keys, 1)) == ["bare", "one task"]
