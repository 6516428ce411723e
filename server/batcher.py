"""Dynamic batching: rows of every task queue together and run as mixed-task batches.

One worker thread owns the model, so the event loop never waits on it. Each request puts its
rows (one modality, one prompt version per row) in that modality's queue; the worker takes the
modality whose oldest row has waited longest, lets the batch fill for up to `max_wait` after
that row arrived (or until `max_batch` rows), and runs it as one forward pass: rows of many
tasks in one batch (the engine's slot pool makes that one call). Text rows are padded only to
the batch's longest sequence. Requests are never split across batches.

A full queue refuses new rows at once (`QueueFullError`, the server's 503 + Retry-After)
instead of growing without bound; a request that timed out or was cancelled before its batch
started is dropped, so abandoned work never reaches the model.

Dimensions: B rows in a batch, T tokens, S image side, E embedding width.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import Tensor

from server.metrics import Metrics

log = logging.getLogger("server.batcher")

MODALITIES = ("image", "text")
Encode = Callable[[str, Tensor, Sequence[Hashable | None]], Tensor]


class QueueFullError(RuntimeError):
    """The queue holds `max_queue_rows`; the caller should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BatcherClosedError(RuntimeError):
    """The batcher is shutting down."""


@dataclass
class _Work:
    modality: str
    rows: list[Tensor]  # image: [3, S, S] each; text: [T_i] token ids each
    keys: list[Hashable | None]
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)
    queued: bool = True  # still in its queue (guarded by the batcher's condition)


class Batcher:
    """Queues rows per modality; one worker thread runs them through `encode` in batches."""

    def __init__(
        self,
        encode: Encode,
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.005,
        max_queue_rows: int = 2048,
        metrics: Metrics | None = None,
    ) -> None:
        self._encode = encode
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue_rows = max_queue_rows
        self._metrics = metrics
        self._queues: dict[str, deque[_Work]] = {m: deque() for m in MODALITIES}
        self._queued = {m: 0 for m in MODALITIES}
        self._cond = threading.Condition()
        self._closed = False
        self._batch_seconds = 0.05  # a running mean, for Retry-After
        self._thread = threading.Thread(target=self._run, name="lpi-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking work, finish the batch in flight, fail whatever still waits."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        for queue in self._queues.values():
            while queue:
                work = queue.popleft()
                if work.future.set_running_or_notify_cancel():
                    work.future.set_exception(BatcherClosedError("the server is shutting down"))

    @property
    def queued_rows(self) -> int:
        with self._cond:
            return sum(self._queued.values())

    def submit(
        self, modality: str, rows: Sequence[Tensor], keys: Sequence[Hashable | None]
    ) -> Future:
        """Queue rows (one key per row); the future resolves to their features [n, E]."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if len(rows) != len(keys) or not rows:
            raise ValueError("give one key per row and at least one row")
        work = _Work(modality, list(rows), list(keys))
        with self._cond:
            if self._closed:
                raise BatcherClosedError("the server is shutting down")
            queued = sum(self._queued.values())
            if queued + len(rows) > self.max_queue_rows:
                if self._metrics:
                    self._metrics.rejected.inc(len(rows))
                raise QueueFullError(
                    f"{queued} rows are waiting (limit {self.max_queue_rows})",
                    retry_after=self._retry_after(queued),
                )
            self._queues[modality].append(work)
            self._queued[modality] += len(rows)
            self._set_gauge()
            self._cond.notify_all()
        work.future.add_done_callback(lambda _: self._withdraw(work))
        return work.future

    def _withdraw(self, work: _Work) -> None:
        """A cancelled request's rows leave the queue at once and free their room."""
        if not work.future.cancelled():
            return
        with self._cond:
            if work.queued:
                work.queued = False
                self._queues[work.modality].remove(work)
                self._queued[work.modality] -= len(work.rows)
                self._set_gauge()

    # -- the worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute(batch)

    def _next_batch(self) -> list[_Work] | None:
        with self._cond:
            while True:
                if self._closed:
                    return None
                modality = self._oldest_modality()
                if modality is None:
                    self._cond.wait()
                    continue
                deadline = self._queues[modality][0].queued_at + self.max_wait_s
                remaining = deadline - time.monotonic()
                if self._queued[modality] >= self.max_batch or remaining <= 0:
                    return self._take(modality)
                self._cond.wait(remaining)

    def _oldest_modality(self) -> str | None:
        heads = [(q[0].queued_at, m) for m, q in self._queues.items() if q]
        return min(heads)[1] if heads else None

    def _take(self, modality: str) -> list[_Work]:
        queue, taken, rows = self._queues[modality], [], 0
        while queue and (not taken or rows + len(queue[0].rows) <= self.max_batch):
            work = queue.popleft()
            work.queued = False
            rows += len(work.rows)
            self._queued[modality] -= len(work.rows)
            if work.future.set_running_or_notify_cancel():  # False: abandoned by its caller
                taken.append(work)
        self._set_gauge()
        return taken

    def _execute(self, batch: list[_Work]) -> None:
        if not batch:
            return
        modality = batch[0].modality
        keys = [key for work in batch for key in work.keys]
        started = time.perf_counter()
        try:
            inputs = _stack(modality, [row for work in batch for row in work.rows])
            features = self._encode(modality, inputs, keys)  # [B, E]
        except Exception as err:  # the worker lives on; only the work at fault fails
            if len(batch) > 1:
                log.warning(
                    "a batch of %d requests failed (%s); running them one by one", len(batch), err
                )
                for work in batch:
                    self._execute([work])
                return
            log.exception("a request of %d %s rows failed", len(keys), modality)
            batch[0].future.set_exception(err)
            return
        elapsed = time.perf_counter() - started
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
        if self._metrics:
            self._metrics.batch_rows.labels(modality).observe(len(keys))
            self._metrics.batch_tasks.labels(modality).observe(len(set(keys)))
            self._metrics.batch_seconds.labels(modality).observe(elapsed)
        start = 0
        for work in batch:
            work.future.set_result(features[start : start + len(work.rows)])
            start += len(work.rows)

    def _retry_after(self, queued: int) -> float:
        batches = queued / self.max_batch + 1
        return round(max(0.1, batches * self._batch_seconds), 2)

    def _set_gauge(self) -> None:
        if self._metrics:
            self._metrics.queue_rows.set(sum(self._queued.values()))


def _stack(modality: str, rows: list[Tensor]) -> Tensor:
    """Rows -> one batch: images [B, 3, S, S]; token ids [B, T], T = the longest row."""
    if modality == "image":
        return torch.stack(rows)
    length = max(int(row.shape[0]) for row in rows)
    tokens = torch.zeros(len(rows), length, dtype=torch.long)  # 0 pads after end-of-text
    for i, row in enumerate(rows):
        tokens[i, : row.shape[0]] = row
    return tokens
