"""The encoders' forward passes captured in CUDA graphs, one per (tower, batch-size bucket).

Why: a ViT-B/16 forward pass launches hundreds of small kernels; replaying a graph removes their
Python and launch cost. Graphs hold pointers, so everything they read is static: the backbone's
weights, the task-slot pool (allocated once, never reallocated: loading, replacing or freeing a
task writes in place, so a captured graph reads the pool as it is at replay), and per-bucket
input, slot and output buffers. A batch of B rows runs in the smallest bucket >= B (powers of
two up to `max_batch`), its extra rows padded with slot -1; rows are independent, so padding
changes no real row. Larger batches, and towers with no pool yet, run eagerly.

Text runs at the full context length (no per-batch trim): with causal attention the tokens
after a row's end-of-text never reach its feature, so the vectors are the same. A batch
leases its slots before the replay and the engine copies the output to the host before the
lease ends, as on the eager path.

Dimensions: B rows, P a bucket's rows, E the embedding size.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import Tensor

import lpi


class GraphedEncoders:
    """Replays captured forward passes of both towers for batches of up to `max_batch` rows."""

    def __init__(self, backbone: lpi.Backbone, max_batch: int, capture: bool = True):
        """capture=False runs the same buffers and padding eagerly (CPU tests of the bucketing;
        capture needs CUDA)."""
        device = next(backbone.parameters()).device
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need the backbone on a CUDA device, not {device}")
        self.backbone = backbone
        self.buckets = bucket_sizes(max_batch)
        self.capture = capture
        self._graphs: dict[tuple, _Graph] = {}
        self._lock = threading.Lock()
        self._memory = torch.cuda.graph_pool_handle() if capture else None

    def run(self, tower: str, data: Tensor, slots: Tensor, pool: object) -> Tensor | None:
        """Unit features [B, E] for rows `data` with slots [B] int32 into `pool`, or None when
        no bucket holds B rows (the caller runs eagerly)."""
        rows = data.shape[0]
        bucket = next((size for size in self.buckets if size >= rows), None)
        if bucket is None:
            return None
        if tower == "text":
            self.backbone._check_tokens(data)  # the eager path's range checks, on the input
        key = (tower, bucket, tuple(data.shape[1:]), data.dtype, id(pool))
        with self._lock:
            graph = self._graphs.get(key)
            if graph is None:
                graph = self._graphs[key] = self._build(tower, bucket, data, pool)
            graph.inputs[:rows].copy_(data)
            graph.slots[:rows].copy_(slots)
            graph.slots[rows:].fill_(-1)  # padding rows: no task
            graph.replay()
            return graph.output[:rows].clone()

    def _build(self, tower: str, bucket: int, data: Tensor, pool: object) -> _Graph:
        inputs = data.new_zeros(bucket, *data.shape[1:])  # [P, ...]
        slots = torch.full((bucket,), -1, dtype=torch.int32, device=data.device)  # [P]
        forward = self._forward(tower)
        prefix = lpi.SlotPrefix(slots, pool)
        if not self.capture:
            graph = _Graph(inputs, slots, None, lambda: forward(inputs, prefix))
            graph.replay()
            return graph
        side = torch.cuda.Stream(device=data.device)
        side.wait_stream(torch.cuda.current_stream(data.device))
        with torch.cuda.stream(side):  # warm-up off the capture stream: autotunes the kernel
            warm_up(forward, inputs, prefix)
        torch.cuda.current_stream(data.device).wait_stream(side)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph, pool=self._memory):
            output = forward(inputs, prefix)  # [P, E]
        return _Graph(inputs, slots, output, cuda_graph.replay)

    def _forward(self, tower: str) -> Callable[[Tensor, lpi.SlotPrefix], Tensor]:
        backbone = self.backbone
        if tower == "image":
            return lambda pixels, prefix: torch.nn.functional.normalize(
                backbone.visual(pixels, prefix), dim=-1
            )
        return lambda tokens, prefix: backbone.text_tower(tokens, prefix)


class _Graph:
    """Static input [P, ...], slots [P] and output [P, E] buffers around one replayable pass."""

    def __init__(self, inputs: Tensor, slots: Tensor, output: Tensor | None, run: Callable):
        self.inputs, self.slots, self.output, self._run = inputs, slots, output, run

    def replay(self) -> None:
        result = self._run()  # a CUDA graph refills `output` in place and returns None
        if result is not None:
            self.output = result  # capture=False: the pass returns a fresh tensor


def warm_up(forward: Callable, inputs: Tensor, prefix: lpi.SlotPrefix) -> None:
    """One pass with every row on slot 0, then the rows back to -1 (no task).

    Why slot 0: the warm-up is where the kernel autotunes, and a row on slot -1 skips the
    prefix loop, so tiles tuned on such rows would be timed without the prefix's work. Slot 0
    always exists (a pool holds at least one); whatever it holds, the pass runs the full loop
    and its output is thrown away. A pool without slots (none is built so) warms up on -1.
    """
    has_slot = getattr(prefix.pool, "slots", 0) >= 1
    prefix.slots.fill_(0 if has_slot else -1)
    try:
        forward(inputs, prefix)
    finally:
        prefix.slots.fill_(-1)


def bucket_sizes(max_batch: int) -> list[int]:
    """Powers of two below max_batch, then max_batch itself: [1, 2, 4, ..., max_batch]."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = []
    size = 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch]
