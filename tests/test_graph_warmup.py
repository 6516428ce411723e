"""The CUDA-graph warm-up (server/graphs.py) runs its rows on a real slot: it is where the kernel
autotunes, and rows on slot -1 skip the prefix loop. On the CPU with the real towers and pool;
the capture itself is checked on a GPU in tests/test_kernel_gpu.py."""

from __future__ import annotations

import torch

import lpi
from kernels import TaskSlotPool
from server.graphs import GraphedEncoders, warm_up
from tests.conftest import CAPTIONS


def test_the_warm_up_runs_the_prefix_then_frees_the_rows(tiny_backbone):
    cfg = tiny_backbone.config.text
    pool = TaskSlotPool(cfg.layers, 2, 3, 4, cfg.width)
    g = torch.Generator().manual_seed(12)
    shapes = [(cfg.layers, 3, 4), (cfg.layers, 4, cfg.width)] * 2
    pool.add("a", *(torch.randn(s, generator=g) for s in shapes))  # slot 0 holds a task
    tokens = lpi.tokenize(CAPTIONS[:3])
    prefix = lpi.SlotPrefix(torch.full((3,), -1, dtype=torch.int32), pool)
    forward = GraphedEncoders(tiny_backbone, max_batch=4, capture=False)._forward("text")
    seen = []

    def spy(inputs, prefix):
        out = forward(inputs, prefix)
        seen.append((prefix.slots.tolist(), out))
        return out

    with torch.no_grad():
        warm_up(spy, tokens, prefix)
        bare = forward(tokens, lpi.SlotPrefix(torch.full((3,), -1, dtype=torch.int32), pool))
    slots, warm = seen[0]
    assert slots == [0, 0, 0]  # every row through the prefix loop
    assert prefix.slots.tolist() == [-1, -1, -1]  # and back to no task for the capture
    # The warm-up's vectors are not the bare tower's: it did the prefix's work.
    assert (warm - bare).abs().max() > 1e-3
