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
import math
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from torch import Tensor

from server.batcher import Batcher
from server.engine import Engine, Key, unusable_rows
from server.exceptions import (
    InvalidRequestError,
    InvalidVectorError,
    ModelTimeoutError,
    NoTaskKeysError,
    ReservedNameError,
    UnusableVectorError,
    WrongDimensionError,
)
from server.inputs import Limits, check_count, decode_base64, image_rows, text_rows
from server.registry import TaskRegistry
from server.resume import index_missing
from server.store import StoreError, VectorStore
from server.store.bulk import check_given_vectors, check_given_version, filter_warnings
from server.store.tuning import SearchOptions
from server.thumbnails import PAYLOAD_KEY, check_free, thumbnail_uri, wanted_side
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
            "tokens": sum(len(row) for row in text_in),  # for usage counts (/v1/embeddings)
        }

    async def _embed_routed(self, text_in: list[Tensor], image_in: list[Tensor]) -> dict:
        """task='auto': each row goes to the task whose keys are nearest its bare features."""
        keys = self.registry.task_keys()
        if len(keys) == 0:
            raise NoTaskKeysError("task 'auto': no loaded task has task keys", "task")
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
            "tokens": sum(len(row) for row in text_in),
        }

    # -- index ----------------------------------------------------------------------------------

    async def index(self, request: schema.IndexRequest) -> dict:
        items = request.items
        modelled = sum(item.vector is None for item in items)  # vectors skip the model
        if modelled > self.limits.max_items:
            check_count(modelled, 0, self.limits, field="items")
        given = check_given_vectors(request, self.engine.embed_dim)
        if request.skip_existing:
            return await index_missing(self, request)
        texts = [(i, item.text) for i, item in enumerate(items) if item.text is not None]
        blobs = [
            (i, decode_base64(item.image, f"items[{i}].image"))
            for i, item in enumerate(items)
            if item.image is not None
        ]
        ids = [item.id or str(uuid.uuid4()) for item in items]
        text_in, image_in = await self._rows_off_loop(
            [t for _, t in texts],
            [b for _, b in blobs],
            [f"items[{i}].text" for i, _ in texts],
            [f"items[{i}].image" for i, _ in blobs],
        )
        payloads = await self._with_thumbnails(request, dict(blobs))
        with self.registry.pin(request.task) as key:
            text_out, image_out = await self._encode_both(
                text_in, [key] * len(text_in), image_in, [key] * len(image_in)
            )
            vectors = _scatter(
                len(items), [i for i, _ in texts], text_out, [i for i, _ in blobs], image_out
            )
            task, version = key
            check_given_version(request, version, given)
            for i, vector in given.items():
                vectors[i] = vector
            with request_fields():
                stored = await run_in_threadpool(
                    self._upsert, task, version, ids, vectors, payloads, given
                )
            serving = self.registry.serving_version(task) == version
        return {"task": task, "prompt_version": version, "ids": stored, "serving": serving}

    def _upsert(self, task, version, ids: list, vectors: list, payloads: list, given=()) -> list:
        getattr(self.store, "ensure_declared", lambda *key: None)(task, version)  # settings'
        self.registry.origins.record(task, version, len(given) < len(ids), bool(given))
        return self.store.upsert(task, version, ids, vectors, payloads)

    async def _with_thumbnails(self, request: schema.IndexRequest, blobs: dict) -> list[dict]:
        """Each item's payload, with a thumbnail data URI where one is asked for."""
        payloads = [dict(item.payload) for item in request.items]
        wanted = {}
        for i, item in enumerate(request.items):
            field = f"items[{i}]"
            if item.image is None and item.thumbnail not in (None, False):
                raise InvalidRequestError(
                    f"{field}.thumbnail: only image items have thumbnails", f"{field}.thumbnail"
                )
            side = None
            if i in blobs:
                side = wanted_side(
                    item.thumbnail, request.thumbnail, self.limits, f"{field}.thumbnail"
                )
            if side is not None:
                check_free(payloads[i], field)
                wanted[i] = side
        if wanted:
            uris = await run_in_threadpool(
                lambda: {
                    i: thumbnail_uri(blobs[i], side, self.limits, f"items[{i}].image")
                    for i, side in wanted.items()
                }
            )
            for i, uri in uris.items():
                payloads[i][PAYLOAD_KEY] = uri
        return payloads

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
            with request_fields():
                hits, index_version, warnings = await run_in_threadpool(
                    self._search_store, request, task, index_version, vector
                )
        await self.registry.origins.after_search(task, index_version, query)
        return {
            "task": task,
            "prompt_version": version,
            "index_version": index_version,
            "hits": [{"id": h.id, "score": h.score, "payload": h.payload} for h in hits],
            "warnings": warnings,
        }

    def _search_store(self, request: schema.SearchRequest, task: str, version: str, vector):
        """The hits, the version they came from, and the filter's warnings (a filtered field
        with no payload index, past the store's threshold): one worker-thread hop."""
        hits = self.store.search(
            task,
            version,
            vector,
            request.top_k,
            request.filter,
            accept_mismatch=request.accept_mismatch,
            options=SearchOptions(exact=request.exact, hnsw_ef=request.hnsw_ef),
        )
        version = hits[0].version if hits else version
        warnings = (
            filter_warnings(self.store, task, version, request.filter) if request.filter else []
        )
        return hits, version, warnings

    # -- stored points ----------------------------------------------------------------------------

    async def points(self, action: str, request) -> dict:
        """Count, list (a page) or delete the serving version's points of a task."""
        with self.registry.pin(request.task, "serving") as (task, version):
            store, answer = self.store, {"task": task, "prompt_version": version}
            with point_fields():
                if action == "count":
                    count = await run_in_threadpool(store.count, task, version, request.filter)
                    return answer | {"count": count}
                if action == "list":
                    rows, after = await run_in_threadpool(
                        lambda: store.list_points(
                            task, version, request.filter, request.limit, request.offset
                        )
                    )
                    points = [{"id": id, "payload": payload} for id, payload in rows]
                    return answer | {"count": len(points), "points": points, "next_offset": after}
                deleted = await run_in_threadpool(
                    lambda: store.delete_points(task, version, request.ids, request.filter)
                )
                return answer | {"count": deleted}

    # -- tasks (admin) --------------------------------------------------------------------------

    @property
    def upload_dir(self) -> Path:
        """Where uploaded artifacts are streamed before a load (swept at start)."""
        return self.registry.state.uploads

    async def list_tasks(self) -> dict:
        infos = await run_in_threadpool(self.registry.infos)
        return {"tasks": infos, "failed": self.registry.failures()}

    async def task_info(self, task: str) -> dict:
        return await run_in_threadpool(self.registry.info, task)

    async def load_task(self, task: str, source: Path, *, promote: bool, shown: str) -> dict:
        """Load or replace `task` from an artifact file; errors name it as `shown`."""
        if task == schema.AUTO:
            raise ReservedNameError("task: 'auto' routes by task keys; pick another name", "task")
        with admin_fields():
            previous, changed = await run_in_threadpool(
                lambda: self.registry.load(task, source, promote=promote, shown=shown)
            )
        info = await self.task_info(task)  # counts vectors: outside the load
        return {"task": info, "previous_version": previous, "changed": changed}

    async def promote_task(self, task: str, version: str, *, force: bool) -> dict:
        with admin_fields():
            await run_in_threadpool(lambda: self.registry.promote(task, version, force=force))
        return await self.task_info(task)

    async def unload_task(self, task: str, *, delete_vectors: bool) -> dict:
        with admin_fields():
            versions = await run_in_threadpool(
                lambda: self.registry.unload(task, delete_vectors=delete_vectors)
            )
        return {"task": task, "unloaded_versions": versions, "vectors_deleted": delete_vectors}

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
            out = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(future)), timeout=self.timeout_s
            )
        except (TimeoutError, asyncio.CancelledError) as err:
            if not future.cancel():  # running or done: let the batch finish under our pins
                with contextlib.suppress(Exception):
                    await asyncio.shield(asyncio.wrap_future(future))
            if isinstance(err, TimeoutError):
                raise ModelTimeoutError(
                    f"the model did not answer within {self.timeout_s} s"
                ) from None
            raise
        _refuse_unusable(modality, out, keys)
        return out

    def _checked_vector(self, vector: list[float]) -> list[float]:
        if len(vector) != self.engine.embed_dim:
            raise WrongDimensionError(
                f"query.vector has {len(vector)} values; this backbone's vectors have "
                f"{self.engine.embed_dim}",
                "query.vector",
            )
        norm = math.hypot(*vector)  # no overflow: 1e200 components are a fine direction
        if not norm > 0 or norm == float("inf"):
            raise InvalidVectorError("query.vector must be finite and non-zero", "query.vector")
        return vector


def _refuse_unusable(modality: str, features: Tensor, keys: Sequence[Key | None]) -> None:
    """A vector that is not a finite unit vector is never served or stored (JSON would carry
    NaN as null): the request is refused, naming the task whose prompts produced it."""
    bad = unusable_rows(features)
    if bad:
        key = keys[bad[0]]
        source = f"task {key[0]!r} (prompt version {key[1]})" if key else "the backbone"
        raise UnusableVectorError(
            f"task: {source} gives a non-finite or zero {modality} vector for this input", "task"
        )


@contextlib.contextmanager
def _store_fields(rename: Callable[[str | None], str]) -> Iterator[None]:
    """A store error raised inside names, through `rename`, the request field that fed the
    store's argument."""
    try:
        yield
    except StoreError as err:
        err.field = rename(err.field)
        raise


def request_fields() -> contextlib.AbstractContextManager[None]:
    """Store errors of /index and /search name the request field, not the store's argument."""
    return _store_fields(_request_field)


def point_fields() -> contextlib.AbstractContextManager[None]:
    """Store errors of /points/*: `ids[2]`, `offset`, `limit` as sent; filters as `filter`."""
    return _store_fields(
        lambda name: "filter" if (name or "").startswith("filter") else name or "task"
    )


def admin_fields() -> contextlib.AbstractContextManager[None]:
    """Store errors of a load or promote: the artifact's width, or the version asked for."""
    return _store_fields(
        lambda name: {"dim": "artifact", "version": "version"}.get(name or "", "task")
    )


def _request_field(field: str | None) -> str:
    """The store's argument -> the request field that fed it: `ids[3]` -> `items[3].id`,
    `payloads[2].a` -> `items[2].payload.a`, `vector` -> `query.vector`."""
    name, bracket, rest = (field or "task").partition("[")
    index, _, tail = rest.partition("]")
    if name in ("ids", "payloads"):
        leaf = ".id" if name == "ids" else ".payload"
        return f"items[{index}]{leaf}{tail}" if bracket else "items"
    if name.startswith("filter"):
        return "filter"
    return {
        "vector": "query.vector",
        "dim": "query.vector",
        "vectors": "items",
        "top_k": "top_k",
    }.get(name, "task")


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
