"""What the routes do, apart from HTTP: embed, index and search through registry, batcher, store.

Each operation pins the prompt versions it uses for its whole life (a swap never changes a
request mid-flight), turns items into rows in a worker thread (decoding is CPU work), waits for
its rows in the batcher with a timeout, and talks to the store in a worker thread (its calls
block). Responses name the task and prompt version that computed every vector.

Dimensions: n rows of a request, E the embedding width.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from contextlib import ExitStack

from starlette.concurrency import run_in_threadpool
from torch import Tensor

from server.batcher import Batcher
from server.engine import Engine, Key
from server.errors import ApiError
from server.inputs import Limits, check_count, decode_base64, image_rows, text_rows
from server.registry import TaskRegistry
from server.store import VectorStore
from wire import schema

log = logging.getLogger("server.service")

INLINE_TEXT_CHARS = 1024  # texts up to this many characters in all are tokenised on the loop


class Service:
    """The operations behind the routes, over one engine, registry, batcher and store."""

    def __init__(
        self,
        engine: Engine,
        registry: TaskRegistry,
        batcher: Batcher,
        store: VectorStore,
        limits: Limits,
        timeout_s: float,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.batcher = batcher
        self.store = store
        self.limits = limits
        self.timeout_s = timeout_s

    # -- embed ----------------------------------------------------------------------------------

    async def embed(self, task: str | None, texts: list[str], images: list[bytes]) -> dict:
        check_count(len(texts), len(images), self.limits)
        text_in, image_in = await self._rows_off_loop(texts, images)
        if task == schema.AUTO:
            return await self._embed_routed(text_in, image_in)
        with ExitStack() as stack:
            key = stack.enter_context(self.registry.pin(task)) if task is not None else None
            text_out, image_out = await self._encode_both(
                text_in, [key] * len(text_in), image_in, [key] * len(image_in)
            )
        return {
            "task": task,
            "prompt_version": key[1] if key else None,
            "backbone": self.engine.backbone_id,
            "text_embeddings": _lists(text_out),
            "image_embeddings": _lists(image_out),
            "prompt_versions": {key[0]: key[1]} if key else {},
        }

    async def _embed_routed(self, text_in: list[Tensor], image_in: list[Tensor]) -> dict:
        """task='auto': each row goes to the task whose keys are nearest its bare features."""
        keys = self.registry.task_keys()
        if len(keys) == 0:
            raise ApiError(409, "no_task_keys", "task 'auto': no loaded task has task keys", "task")
        bare_text, bare_image = await self._encode_both(
            text_in, [None] * len(text_in), image_in, [None] * len(image_in)
        )
        text_tasks = keys.route_names(bare_text, "text") if text_in else []
        image_tasks = keys.route_names(bare_image, "image") if image_in else []
        with self.registry.pin_many([*text_tasks, *image_tasks]) as pinned:
            text_out, image_out = await self._encode_both(
                text_in, [pinned[t] for t in text_tasks], image_in, [pinned[t] for t in image_tasks]
            )
        return {
            "task": schema.AUTO,
            "prompt_version": None,
            "backbone": self.engine.backbone_id,
            "text_embeddings": _lists(text_out),
            "image_embeddings": _lists(image_out),
            "text_tasks": text_tasks if text_in else None,
            "image_tasks": image_tasks if image_in else None,
            "prompt_versions": {task: version for task, version in pinned.values()},
        }

    # -- index ----------------------------------------------------------------------------------

    async def index(self, request: schema.IndexRequest) -> dict:
        items = request.items
        if len(items) > self.limits.max_items:
            check_count(len(items), 0, self.limits, field="items")
        texts = [(i, item.text) for i, item in enumerate(items) if item.text is not None]
        blobs = [
            (i, decode_base64(item.image, f"items[{i}].image"))
            for i, item in enumerate(items)
            if item.image is not None
        ]
        ids = [item.id or str(uuid.uuid4()) for item in items]
        text_in, image_in = await self._rows_off_loop(
            [t for _, t in texts], [b for _, b in blobs],
            [f"items[{i}].text" for i, _ in texts], [f"items[{i}].image" for i, _ in blobs],
        )  # fmt: skip
        with self.registry.pin(request.task) as key:
            text_out, image_out = await self._encode_both(
                text_in, [key] * len(text_in), image_in, [key] * len(image_in)
            )
            vectors = _scatter(len(items), [i for i, _ in texts], text_out, [i for i, _ in blobs],
                               image_out)  # fmt: skip
            payloads = [dict(item.payload) for item in items]
            task, version = key
            stored = await run_in_threadpool(
                self.store.upsert, task, version, ids, vectors, payloads
            )
            serving = self.registry.serving_version(task) == version
        return {"task": task, "prompt_version": version, "ids": stored, "serving": serving}

    # -- search ---------------------------------------------------------------------------------

    async def search(self, request: schema.SearchRequest) -> dict:
        query = request.query
        purpose = "active" if request.accept_mismatch else "serving"
        with self.registry.pin(request.task, purpose) as key:
            if query.vector is not None:
                vector = self._checked_vector(query.vector)
            else:
                texts = [query.text] if query.text is not None else []
                blobs = [decode_base64(query.image, "query.image")] if query.image else []
                text_in, image_in = await self._rows_off_loop(
                    texts, blobs, ["query.text"], ["query.image"]
                )
                modality, rows = ("text", text_in) if texts else ("image", image_in)
                vector = (await self._encode(modality, rows, [key]))[0].tolist()
            task, version = key
            # Without accept_mismatch the query's version is the vectors' version, even if a
            # promote lands meanwhile; with it, the newest query meets the serving vectors.
            index_version = version
            if request.accept_mismatch:
                index_version = self.registry.serving_version(task) or version
            hits = await run_in_threadpool(
                lambda: self.store.search(
                    task, index_version, vector, request.top_k, request.filter,
                    accept_mismatch=request.accept_mismatch,
                )
            )  # fmt: skip
        index_version = hits[0].version if hits else index_version
        return {
            "task": task,
            "prompt_version": version,
            "index_version": index_version,
            "hits": [{"id": h.id, "score": h.score, "payload": h.payload} for h in hits],
        }

    # -- helpers --------------------------------------------------------------------------------

    async def _rows_off_loop(self, texts: list[str], images: list[bytes], *fields):
        """Decode in a worker thread, except a few short texts: tokenising them costs less
        than the thread hop (the event loop waits well under a millisecond)."""
        if not images and sum(map(len, texts)) <= INLINE_TEXT_CHARS:
            return self._rows(texts, images, *fields)
        return await run_in_threadpool(self._rows, texts, images, *fields)

    def _rows(
        self,
        texts: list[str],
        blobs: list[bytes],
        text_fields: list[str] | None = None,
        image_fields: list[str] | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        text_fields = text_fields or [f"texts[{i}]" for i in range(len(texts))]
        image_fields = image_fields or [f"images[{i}]" for i in range(len(blobs))]
        text_in = text_rows(texts, self.limits, text_fields) if texts else []
        image_in = image_rows(blobs, self.limits, image_fields) if blobs else []
        return text_in, image_in

    async def _encode_both(self, text_in, text_keys, image_in, image_keys):
        """Both modalities at once; if one fails, the other is withdrawn (or waited for)."""
        try:
            async with asyncio.TaskGroup() as group:
                text = group.create_task(self._encode("text", text_in, text_keys))
                image = group.create_task(self._encode("image", image_in, image_keys))
        except BaseExceptionGroup as errors:
            raise errors.exceptions[0] from None
        return text.result(), image.result()

    async def _encode(self, modality: str, rows: list[Tensor], keys: Sequence[Key | None]):
        """Rows through the batcher. A caller that gives up (timeout, cancellation) withdraws
        its rows; if their batch is already running, it waits for it, so the prompt versions
        it pinned stay loaded until no batch names them."""
        if not rows:
            return None
        future = self.batcher.submit(modality, rows, keys)
        try:
            return await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(future)), timeout=self.timeout_s
            )
        except (TimeoutError, asyncio.CancelledError) as err:
            if not future.cancel():  # running or done: let the batch finish under our pins
                with contextlib.suppress(Exception):
                    await asyncio.shield(asyncio.wrap_future(future))
            if isinstance(err, TimeoutError):
                raise ApiError(
                    503, "timeout", f"the model did not answer within {self.timeout_s} s"
                ) from None
            raise

    def _checked_vector(self, vector: list[float]) -> list[float]:
        if len(vector) != self.engine.embed_dim:
            raise ApiError(
                422, "wrong_dimension", f"query.vector has {len(vector)} values; this "
                f"backbone's vectors have {self.engine.embed_dim}", "query.vector",
            )  # fmt: skip
        norm = sum(v * v for v in vector) ** 0.5
        if not norm > 0 or norm == float("inf"):
            raise ApiError(422, "invalid_vector", "query.vector must be finite and non-zero",
                           "query.vector")  # fmt: skip
        return vector


def _lists(features: Tensor | None) -> list[list[float]] | None:
    return None if features is None else features.tolist()


def _scatter(n: int, text_at: list[int], text: Tensor | None, image_at: list[int], image) -> list:
    """Rows back into item order: the features of item i at position i."""
    out: list = [None] * n
    for positions, features in ((text_at, text), (image_at, image)):
        rows = features.tolist() if features is not None else []
        for position, row in zip(positions, rows, strict=True):
            out[position] = row
    return out
