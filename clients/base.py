"""The I/O-free half of the SDK that `Client` (clients/sync.py) and `AsyncClient` (clients/aio.py)
share: request building, response parsing, chunking and the retry policy.

Every public method is a *plan*: a generator that yields the `Call`s it needs, one at a time, and
receives each call's parsed answer (the sans-I/O pattern of h11 and h2). Most plans are one call;
the chunking helpers yield one call per chunk. A twin only sends a call, retrying as
`RetryPolicy` says, and sleeps between attempts, so the two cannot drift apart;
tests/test_clients.py runs every method through both against the real app.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from clients.calls import (  # re-exported: the SDK's helpers have lived here
    Call,
    ImageInput,
    ItemInput,
    T,
    _b64,
    _images,
    _parse,
    _progress,
    _task,
    _text,
    _texts,
    as_item,
    chunks,
    delete_calls,
    embed_call,
    image_bytes,
    image_item,  # noqa: F401 (re-exported)
    index_call,
    merge_embeddings,
    points_call,
    routing_headers,
    safe_to_resend,
    search_call,
    text_item,  # noqa: F401 (re-exported)
    to_numpy,
    worth_retrying,
)
from clients.errors import ConnectionFailed, error_from_response
from wire import schema

log = logging.getLogger("clients")

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 60.0
DEFAULT_CHUNK = 64  # the server's default max_items: texts + images (or items) per request
USER_AGENT = "lpi-serve-client/0.1.0"

Plan = Generator["Call", Any, T]


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before sending a call again.

    Retried: a 503 (busy, stopping, store down), a 409 with Retry-After (a fleet replica loading
    the task), a connection that never opened, and, for a call safe to repeat (`repeatable`), no
    answer or a 500 the server did not write; never another 4xx, nor another 5xx. Waits double
    from `backoff` up to `max_backoff`, each drawn from its upper half (jitter: clients that
    failed together do not come back together); Retry-After replaces it, up to `max_retry_after`.
    """

    retries: int = 3  # attempts after the first
    backoff: float = 0.5  # seconds before the first retry
    max_backoff: float = 8.0
    max_retry_after: float = 30.0

    def __post_init__(self) -> None:
        if self.retries < 0 or min(self.backoff, self.max_backoff, self.max_retry_after) < 0:
            raise ValueError("retries and waits must not be negative")

    def delay(
        self,
        attempt: int,
        retry_after: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> float:
        """Seconds to wait after failed attempt `attempt` (0 for the first)."""
        if retry_after is not None:
            return min(self.max_retry_after, retry_after * (1 + 0.1 * rand()))
        return min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + 0.5 * rand())


@dataclass(frozen=True)
class Retry:
    """The answer to a failed attempt: send the call again after `delay` seconds."""

    delay: float


class BaseClient:
    """What `Client` and `AsyncClient` share; each adds only `_send`, `_run` and `_sleep`."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        retries: int | RetryPolicy = 3,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retries if isinstance(retries, RetryPolicy) else RetryPolicy(retries=retries)
        self._api_key, self._admin_key = api_key, admin_key

    # -- sending: what the twins call around their one line of I/O ------------------------------

    def _request(self, call: Call) -> dict[str, Any]:
        """Keyword arguments for httpx's `Client.request` and `AsyncClient.request`."""
        # The server accepts the admin key for queries too, so either key alone can do
        # everything it is allowed to.
        key = (
            (self._admin_key or self._api_key) if call.admin else (self._api_key or self._admin_key)
        )
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        kwargs: dict[str, Any] = {"method": call.method, "url": call.path, "params": call.params}
        if call.body is not None:
            kwargs["content"] = call.body.model_dump_json().encode()
            headers["Content-Type"] = "application/json"
        elif call.content is not None:
            kwargs["content"] = call.content
            headers["Content-Type"] = "application/octet-stream"
        elif call.files:
            kwargs["data"], kwargs["files"] = call.form, list(call.files)
        kwargs["headers"] = headers | routing_headers(call)
        return kwargs

    def _answer(self, call: Call, response: httpx.Response, attempt: int) -> Any:
        """The parsed answer, a `Retry` for a 503 while retries are left, or the error raised."""
        status = response.status_code
        if status in call.ok:
            return _parse(call, response)
        again, hint = worth_retrying(call, response)
        if again and attempt < self.retry.retries:
            wait = self.retry.delay(attempt, hint)
            return self._retrying(call, f"{status} (server busy or lost)", attempt, wait)
        raise error_from_response(status, response.content, response.headers)

    def _failure(self, call: Call, error: httpx.TransportError, attempt: int) -> Retry:
        """A `Retry` for a request that got no answer while retries are left and sending it
        again is safe (it never left, or the call is repeatable), else the error."""
        safe = safe_to_resend(call, error)
        if safe and attempt < self.retry.retries:
            wait = self.retry.delay(attempt)
            return self._retrying(call, _describe(error), attempt, wait)
        kind = "timeout" if isinstance(error, httpx.TimeoutException) else "connection_failed"
        unknown = "; not sent again: the server may have done it" if safe is False else ""
        raise ConnectionFailed(
            f"{call.method} {self.base_url}{call.path}: {_describe(error)}{unknown}", type=kind
        ) from error

    def _retrying(self, call: Call, reason: str, attempt: int, wait: float) -> Retry:
        log.warning(
            "%s %s: %s; retry %d of %d in %.2f s",
            call.method,
            call.path,
            reason,
            attempt + 1,
            self.retry.retries,
            wait,
        )
        return Retry(wait)

    # -- plans: one per public method, the twins' single source of behaviour and docs ----------

    def _embed(
        self, texts: Sequence[str] = (), images: Sequence[ImageInput] = (), task: str | None = None
    ) -> Plan[schema.EmbedResponse]:
        """Embed texts and images in one request: unit vectors in input order.

        `task` is a loaded task, "auto" (each row routed to the task its task keys choose) or
        None (the bare backbone). Images are file bytes, local file paths or PIL images; they
        travel as a multipart form. One request holds at most the server's `max_items` inputs;
        `embed_texts` and `embed_images` chunk longer lists.
        """
        return (yield embed_call(_texts(texts), [image_bytes(i) for i in _images(images)], task))

    def _embed_texts(
        self,
        texts: Sequence[str],
        task: str | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        progress: bool = False,
        numpy: bool = False,
    ) -> Plan[Any]:
        """Embed any number of texts, `chunk_size` per request, as one `EmbedResponse` (or with
        `numpy=True` a float32 array [n, E]; numpy needed).

        Raises `VersionChangedError` if a new prompt version of the task was loaded between
        chunks (the vectors would not be comparable).
        """
        texts = _texts(texts)
        if not texts:
            raise ValueError("texts: give at least one text")
        parts = []
        with _progress(progress, len(texts), "embed") as bar:
            for chunk in chunks(texts, chunk_size):
                parts.append((yield embed_call(chunk, [], task)))
                bar.update(len(chunk))
        merged = merge_embeddings(parts)
        return to_numpy(merged).text if numpy else merged

    def _embed_images(
        self,
        images: Sequence[ImageInput],
        task: str | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        progress: bool = False,
        numpy: bool = False,
    ) -> Plan[Any]:
        """Embed any number of images (bytes, paths or PIL images), `chunk_size` per request,
        as one `EmbedResponse` (or an array [n, E] with `numpy=True`); files are read one
        chunk at a time."""
        images = _images(images)
        if not images:
            raise ValueError("images: give at least one image")
        parts = []
        with _progress(progress, len(images), "embed") as bar:
            for chunk in chunks(images, chunk_size):
                parts.append((yield embed_call([], [image_bytes(i) for i in chunk], task)))
                bar.update(len(chunk))
        merged = merge_embeddings(parts)
        return to_numpy(merged).image if numpy else merged

    def _index(self, task: str, items: Iterable[ItemInput]) -> Plan[schema.IndexResponse]:
        """Embed items with the task's newest prompt version and store them; one request.

        Items are `IndexItem`s, dicts of its fields (images base64) or `text_item(...)` /
        `image_item(...)`. An item without an id gets a random UUID here rather than on the
        server, so a retried request overwrites the same points instead of adding copies.
        """
        return (yield index_call(_task(task), [as_item(i) for i in items]))

    def _index_many(
        self,
        task: str,
        items: Iterable[ItemInput],
        *,
        chunk_size: int = DEFAULT_CHUNK,
        progress: bool = True,
        skip_existing: bool = False,
        prompt_version: str | None = None,
    ) -> Plan[list[schema.IndexResponse]]:
        """Index any number of items, `chunk_size` per request; one `IndexResponse` per chunk.

        `items` may be a lazy iterable (a generator of `image_item`s reads each file only when
        its chunk is sent). The progress bar (tqdm, on stderr) shows only on a terminal.
        `skip_existing` resumes a run (ids stored under the version are skipped);
        `prompt_version` names the version that made items' precomputed `vector`s.
        """
        _task(task)
        total = len(items) if isinstance(items, Sized) else None
        answers = []
        options = {"skip_existing": skip_existing, "prompt_version": prompt_version}
        with _progress(progress, total, f"index {task}") as bar:
            for chunk in chunks(items, chunk_size):
                answers.append((yield index_call(task, [as_item(i) for i in chunk], **options)))
                bar.update(len(chunk))
        return answers

    def _search(
        self,
        task: str,
        *,
        text: str | None = None,
        image: ImageInput | None = None,
        vector: Sequence[float] | None = None,
        top_k: int = 10,
        filter: Mapping[str, schema.FilterValue] | None = None,
        accept_mismatch: bool = False,
        exact: bool = False,
        hnsw_ef: int | None = None,
    ) -> Plan[schema.SearchResponse]:
        """The `top_k` stored items nearest a text, an image or a vector (give exactly one).

        `filter` keeps items whose payload matches every key exactly. Searches compare only
        vectors of one prompt version: the serving one, or with `accept_mismatch` the query is
        embedded with the newest loaded version even if the stored vectors are older.
        `exact` scores every stored vector (audits); `hnsw_ef` trades speed for recall.
        """
        query = schema.SearchQuery(
            text=text,
            image=None if image is None else _b64(image_bytes(image)),
            vector=None if vector is None else [float(v) for v in vector],
        )
        body = schema.SearchRequest(
            task=task,
            query=query,
            top_k=top_k,
            filter=None if filter is None else dict(filter),
            accept_mismatch=accept_mismatch,
            exact=exact,
            hnsw_ef=hnsw_ef,
        )
        return (yield search_call(body))

    def _count_points(
        self, task: str, filter: Mapping[str, schema.FilterValue] | None = None
    ) -> Plan[int]:
        """How many points the task's serving version stores (matching `filter`, if given)."""
        return (yield points_call("count", task, filter)).count

    def _list_points(
        self,
        task: str,
        filter: Mapping[str, schema.FilterValue] | None = None,
        *,
        limit: int = 100,
        offset: str | None = None,
    ) -> Plan[schema.PointsResponse]:
        """One page of stored points (`.points`: id and payload); pass `.next_offset` back as
        `offset` for the next page (None after the last)."""
        return (yield points_call("list", task, filter, limit, offset))

    def _all_points(
        self,
        task: str,
        filter: Mapping[str, schema.FilterValue] | None = None,
        *,
        page_size: int = 1000,
    ) -> Plan[list[schema.StoredPoint]]:
        """Every stored point of the serving version (matching `filter`), page by page."""
        points: list[schema.StoredPoint] = []
        offset: str | None = None
        while True:
            page = yield points_call("list", task, filter, page_size, offset)
            points += page.points or []
            if (offset := page.next_offset) is None:
                return points

    def _delete_points(
        self,
        task: str,
        ids: Sequence[str] | None = None,
        filter: Mapping[str, schema.FilterValue] | None = None,
    ) -> Plan[int]:
        """Delete stored points by id (any number, in chunks) or by payload filter (give
        exactly one); returns how many existed."""
        deleted = 0
        for call in delete_calls(task, ids, filter):
            deleted += (yield call).count
        return deleted

    def _list_tasks(self) -> Plan[schema.TaskList]:
        """Every loaded task (`.tasks`: a `TaskInfo` each)."""
        return (yield Call("GET", "/tasks", schema.TaskList.model_validate_json))

    def _get_task(self, task: str) -> Plan[schema.TaskInfo]:
        """One loaded task's versions, shape and vector count; `NotFoundError` if not loaded."""
        return (yield Call("GET", f"/tasks/{_task(task)}", schema.TaskInfo.model_validate_json))

    def _load_task(
        self,
        task: str,
        path_or_bytes: str | os.PathLike[str] | bytes | None = None,
        *,
        server_path: str | None = None,
        promote: bool = False,
    ) -> Plan[schema.LoadTaskResponse]:
        """Load (or replace) a task's prompts from an artifact; admin key.

        Give a local artifact (a file path or its bytes), uploaded in the body, or `server_path`,
        a path inside the server's artifact directory. The new version embeds and indexes at
        once; `promote=True` also makes /search use it now, without re-indexing (vectors of the
        old version stop being searched); otherwise re-index, then `promote`.
        """
        path = f"/tasks/{_task(task)}"
        parse = schema.LoadTaskResponse.model_validate_json
        if (path_or_bytes is None) == (server_path is None):
            raise ValueError("load_task: give a local artifact (path or bytes) or server_path")
        if server_path is not None:
            body = schema.LoadTaskRequest(path=os.fspath(server_path), promote=promote)
            call = Call("PUT", path, parse, body=body, admin=True)
        else:
            assert path_or_bytes is not None  # exactly one of the two is given (checked above)
            data = (
                bytes(path_or_bytes)
                if isinstance(path_or_bytes, (bytes, bytearray, memoryview))
                else Path(path_or_bytes).read_bytes()
            )
            call = Call("PUT", path, parse, content=data, params={"promote": promote}, admin=True)
        return (yield call)

    def _promote(self, task: str, version: str, *, force: bool = False) -> Plan[schema.TaskInfo]:
        """Make a loaded prompt version the one /search uses (after re-indexing under it). A
        version with no vectors while the serving one has some is refused (409,
        `version_not_indexed`): /search would find nothing. `force=True` promotes it anyway."""
        body = schema.PromoteRequest(version=version, force=force)
        call = Call(
            "POST",
            f"/tasks/{_task(task)}/promote",
            schema.TaskInfo.model_validate_json,
            body=body,
            admin=True,
            idempotent=True,  # a second promote sets the same state and answers the same
        )
        return (yield call)

    def _unload_task(
        self, task: str, *, delete_vectors: bool = False
    ) -> Plan[schema.UnloadResponse]:
        """Stop serving a task (every version); `delete_vectors` also drops its stored vectors."""
        call = Call(
            "DELETE",
            f"/tasks/{_task(task)}",
            schema.UnloadResponse.model_validate_json,
            params={"delete_vectors": delete_vectors},
            admin=True,
        )
        return (yield call)

    def _health(self) -> Plan[schema.Health]:
        """Liveness: the process answers."""
        return (yield Call("GET", "/healthz", schema.Health.model_validate_json))

    def _ready(self) -> Plan[schema.Readiness]:
        """Readiness, with the reasons when not ready (a 503 here is an answer, not retried)."""
        ok = frozenset({200, 503})
        return (yield Call("GET", "/readyz", schema.Readiness.model_validate_json, ok=ok))

    def _metrics(self) -> Plan[str]:
        """The Prometheus metrics text."""
        return (yield Call("GET", "/metrics", _text))


def mirror_docs(cls: type[T]) -> type[T]:
    """Give each public method of a twin the docstring of the base's plan of the same name."""
    for name, method in vars(cls).items():
        plan = getattr(BaseClient, f"_{name}", None)
        if not name.startswith("_") and callable(method) and plan is not None:
            method.__doc__ = method.__doc__ or plan.__doc__
    return cls


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
