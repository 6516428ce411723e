"""The CUDA-graph runner's buckets and padding, run eagerly on the CPU (capture needs CUDA; the
replay itself is checked in tests/test_kernel_gpu.py). Dimensions: B rows, E embedding size."""

from __future__ import annotations

import pytest
import torch

import lpi
from kernels import TaskSlotPool
from server.graphs import GraphedEncoders, bucket_sizes
from tests.conftest import CAPTIONS, random_pixels


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert bucket_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    with pytest.raises(ValueError, match="max_batch"):
        bucket_sizes(0)


def test_capture_needs_cuda(tiny_backbone):
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedEncoders(tiny_backbone, max_batch=4)


@pytest.fixture
def pools(tiny_backbone):
    g = torch.Generator().manual_seed(3)
    made = {}
    for tower, cfg in (("image", tiny_backbone.config.vision), ("text", tiny_backbone.config.text)):
        pool = TaskSlotPool(cfg.layers, 3, 2, 4, cfg.width)
        shapes = [(cfg.layers, 2, 3), (cfg.layers, 3, cfg.width)] * 2
        pool.add("a", *(torch.randn(s, generator=g) for s in shapes))
        made[tower] = pool
    return made


def test_padded_bucket_equals_the_eager_pass(tiny_backbone, pools, generator):
    """5 rows run in the 8-row bucket padded with slot -1; a second, smaller batch reuses the
    buffers; every real row equals the eager encoder's."""
    graphs = GraphedEncoders(tiny_backbone, max_batch=8, capture=False)
    rows = ["a", None, "a", None, "a"]
    pixels = random_pixels(tiny_backbone, 5, generator)
    tokens = lpi.tokenize((CAPTIONS * 3)[:5])
    with torch.no_grad():
        for tower, data, encode in (
            ("image", pixels, tiny_backbone.encode_image),
            ("text", tokens, tiny_backbone.encode_text),
        ):
            pool = pools[tower]
            for n in (5, 3):
                with pool.lease(rows[:n]) as slots:
                    got = graphs.run(tower, data[:n], slots, pool)
                    expected = encode(data[:n], lpi.SlotPrefix(slots, pool))
                assert got.shape == expected.shape
                # fp32, the same kernels; text runs the full context instead of the trimmed one,
                # which causal attention makes equal up to summation order.
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert graphs.run("image", random_pixels(tiny_backbone, 9, generator), None, None) is None
