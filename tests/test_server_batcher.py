"""The dynamic batcher alone, over a fake encoder that records every batch it gets."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from server.batcher import Batcher, BatcherClosedError, QueueFullError


class Recorder:
    """An encoder that returns each row's first value, after an optional gate or delay."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.batches: list[tuple[str, tuple, list]] = []
        self.delay, self.gate = delay, gate

    def __call__(self, modality, inputs, keys):
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay)
        self.batches.append((modality, tuple(inputs.shape), list(keys)))
        flat = inputs.reshape(inputs.shape[0], -1).float()
        return flat[:, :1].repeat(1, 4)  # [B, 4]: each row's first value


def encode(batcher: Batcher, modality, rows, keys):
    """What the server awaits: the batcher's future on the event loop."""
    return asyncio.wrap_future(batcher.submit(modality, rows, keys))


def text_row(first: int, length: int) -> torch.Tensor:
    return torch.arange(first, first + length)


def test_rows_of_many_tasks_share_a_batch_and_come_back_in_order():
    encoder = Recorder()
    batcher = Batcher(encoder, max_batch=64, max_wait_s=0.05)
    batcher.start()

    async def scenario():
        calls = [
            encode(batcher, "text", [text_row(10 * n, 3 + n % 4)], [("task", str(n % 3))])
            for n in range(12)
        ]
        return await asyncio.gather(*calls)

    try:
        results = asyncio.run(scenario())
    finally:
        batcher.close()
    assert [int(r[0, 0]) for r in results] == [10 * n for n in range(12)]
    assert len(encoder.batches) == 1  # one forward pass for all twelve
    modality, shape, keys = encoder.batches[0]
    assert modality == "text" and shape == (12, 6)  # padded to the longest row, not to 77
    assert len(set(keys)) == 3


def test_batches_respect_the_size_limit_and_never_split_a_request():
    encoder = Recorder()
    batcher = Batcher(encoder, max_batch=8, max_wait_s=0.05)
    batcher.start()

    async def scenario():
        rows = lambda n: [torch.randn(3, 4, 4) for _ in range(n)]  # noqa: E731
        sizes = [3, 3, 3, 5, 1, 8]
        return await asyncio.gather(*(encode(batcher, "image", rows(n), [None] * n) for n in sizes))

    try:
        results = asyncio.run(scenario())
    finally:
        batcher.close()
    assert [r.shape[0] for r in results] == [3, 3, 3, 5, 1, 8]
    assert all(shape[0] <= 8 for _, shape, _ in encoder.batches)
    assert sum(shape[0] for _, shape, _ in encoder.batches) == 23


def test_modalities_batch_separately():
    encoder = Recorder()
    batcher = Batcher(encoder, max_batch=32, max_wait_s=0.05)
    batcher.start()

    async def scenario():
        return await asyncio.gather(
            encode(batcher, "text", [text_row(1, 2)], [None]),
            encode(batcher, "image", [torch.ones(3, 2, 2)], [None]),
            encode(batcher, "text", [text_row(5, 4)], [None]),
        )

    try:
        asyncio.run(scenario())
    finally:
        batcher.close()
    assert sorted((m, s[0]) for m, s, _ in encoder.batches) == [("image", 1), ("text", 2)]


def test_a_full_queue_refuses_at_once_with_a_retry_hint():
    gate = threading.Event()
    batcher = Batcher(Recorder(gate=gate), max_batch=2, max_wait_s=0.0, max_queue_rows=4)
    batcher.start()
    try:
        first = batcher.submit("text", [text_row(1, 2)] * 2, [None] * 2)  # the worker takes it
        time.sleep(0.1)
        waiting = batcher.submit("text", [text_row(1, 2)] * 4, [None] * 4)  # fills the queue
        with pytest.raises(QueueFullError) as refused:
            batcher.submit("text", [text_row(1, 2)], [None])
        assert refused.value.retry_after > 0
        gate.set()
        assert first.result(10).shape == (2, 4) and waiting.result(10).shape == (4, 4)
    finally:
        gate.set()
        batcher.close()


def test_cancelled_work_never_reaches_the_model():
    gate = threading.Event()
    encoder = Recorder(gate=gate)
    batcher = Batcher(encoder, max_batch=1, max_wait_s=0.0)
    batcher.start()
    try:
        busy = batcher.submit("text", [text_row(1, 2)], [("a", "1")])
        time.sleep(0.1)
        abandoned = batcher.submit("text", [text_row(2, 2)], [("b", "1")])
        assert abandoned.cancel()
        gate.set()
        busy.result(10)
        later = batcher.submit("text", [text_row(3, 2)], [("c", "1")])
        later.result(10)
    finally:
        gate.set()
        batcher.close()
    assert [keys for _, _, keys in encoder.batches] == [[("a", "1")], [("c", "1")]]


def test_an_encoder_error_fails_only_its_batch():
    calls = {"n": 0}

    def flaky(modality, inputs, keys):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return torch.zeros(inputs.shape[0], 4)

    batcher = Batcher(flaky, max_batch=4, max_wait_s=0.0)
    batcher.start()
    try:
        with pytest.raises(RuntimeError, match="boom"):
            batcher.submit("text", [text_row(1, 2)], [None]).result(10)
        assert batcher.submit("text", [text_row(1, 2)], [None]).result(10).shape == (1, 4)
    finally:
        batcher.close()


def test_close_fails_waiting_work_and_refuses_new():
    gate = threading.Event()
    batcher = Batcher(Recorder(gate=gate), max_batch=1, max_wait_s=0.0)
    batcher.start()
    batcher.submit("text", [text_row(1, 2)], [None])
    time.sleep(0.05)
    waiting = batcher.submit("text", [text_row(1, 2)], [None])
    threading.Timer(0.2, gate.set).start()
    batcher.close()
    with pytest.raises(BatcherClosedError):
        waiting.result(1)
    with pytest.raises(BatcherClosedError):
        batcher.submit("text", [text_row(1, 2)], [None])


def test_cancelled_rows_free_their_room_at_once():
    gate = threading.Event()
    batcher = Batcher(Recorder(gate=gate), max_batch=1, max_wait_s=0.0, max_queue_rows=2)
    batcher.start()
    try:
        batcher.submit("text", [text_row(1, 2)], [None])  # taken by the worker, held
        time.sleep(0.1)
        waiting = batcher.submit("text", [text_row(2, 2)] * 2, [None] * 2)
        assert batcher.queued_rows == 2
        assert waiting.cancel()
        assert batcher.queued_rows == 0
        batcher.submit("text", [text_row(3, 2)] * 2, [None] * 2)  # the room is free again
    finally:
        gate.set()
        batcher.close()


def test_a_failing_request_does_not_fail_the_others_in_its_batch():
    def picky(modality, inputs, keys):
        if "bad" in keys:
            raise KeyError("bad is not loaded")
        return torch.zeros(inputs.shape[0], 4)

    batcher = Batcher(picky, max_batch=8, max_wait_s=0.05)
    batcher.start()
    try:
        good = batcher.submit("text", [text_row(1, 2)], ["good"])
        bad = batcher.submit("text", [text_row(1, 2)], ["bad"])
        other = batcher.submit("text", [text_row(1, 2)] * 2, [None, "good"])
        assert good.result(10).shape == (1, 4) and other.result(10).shape == (2, 4)
        with pytest.raises(KeyError):
            bad.result(10)
    finally:
        batcher.close()
