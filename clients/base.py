"""The I/O-free half of the SDK that `Client` (clients/sync.py) and `AsyncClient` (clients/aio.py)
share: request building, response parsing, chunking and the retry policy.

Every public method is a *plan*: a generator that yields the `Call`s it needs, one at a time, and
receives each call's parsed answer (the sans-I/O pattern of h11 and h2). Most plans are one call;
the chunking helpers yield one call per chunk. A twin only sends a call, retrying as
`RetryPolicy` says, and sleeps between attempts, so the two cannot drift apart;
tests/test_clients.py runs every method through both against the real app.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import random
import sys
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from clients.errors import (
    ConnectionFailed,
    InvalidResponseError,
    VersionChangedError,
    error_from_response,
    parse_retry_after,
)
from wire import schema

log = logging.getLogger("clients")

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 60.0
DEFAULT_CHUNK = 64  # the server's default max_items: texts + images (or items) per request
USER_AGENT = "lpi-serve-client/0.1.0"

T = TypeVar("T")
Plan = Generator["Call", Any, T]
# bytes of an image file, a local file path, or a PIL image (PIL is never imported here).
ImageInput = bytes | bytearray | memoryview | str | os.PathLike | Any
ItemInput = schema.IndexItem | Mapping[str, Any]

# No answer came: worth another try. Other transport errors (a bad URL scheme, a proxy refusing
# us) would fail the same way again.
RETRYABLE = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before sending a call again.

    Only a 503 (queue full, shutting down, store unavailable) and a request that got no answer
    (connection refused or reset, timeout) are retried; never a 4xx, which would be refused
    again, nor another 5xx, which may have done part of its work. Waits double from `backoff`
    up to `max_backoff`, each drawn from its upper half (jitter, so clients that failed together
    do not come back together); a 503's Retry-After replaces the backoff, capped at
    `max_retry_after`.
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
class Call:
    """One HTTP request as data, and how to read its answer."""

    method: str
    path: str
    parse: Callable[[bytes], Any]
    body: BaseModel | None = None  # sent as JSON
    content: bytes | None = None  # sent as application/octet-stream
    params: Mapping[str, Any] | None = None
    form: Mapping[str, Any] | None = None  # multipart fields, sent with `files`
    files: tuple[tuple[str, tuple[str, bytes, str]], ...] = ()
    admin: bool = False  # sent with the admin key
    ok: frozenset[int] = frozenset({200})  # statuses whose body `parse` reads


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
        kwargs["headers"] = headers
        return kwargs

    def _answer(self, call: Call, response: httpx.Response, attempt: int) -> Any:
        """The parsed answer, a `Retry` for a 503 while retries are left, or the error raised."""
        status = response.status_code
        if status in call.ok:
            return _parse(call, response)
        if status == 503 and attempt < self.retry.retries:
            hint = parse_retry_after(response.headers.get("retry-after"))
            wait = self.retry.delay(attempt, hint)
            return self._retrying(call, "503 (server busy)", attempt, wait)
        raise error_from_response(status, response.content, response.headers)

    def _failure(self, call: Call, error: httpx.TransportError, attempt: int) -> Retry:
        """A `Retry` for a request that got no answer while retries are left, else the error."""
        if isinstance(error, RETRYABLE) and attempt < self.retry.retries:
            wait = self.retry.delay(attempt)
            return self._retrying(call, _describe(error), attempt, wait)
        kind = "timeout" if isinstance(error, httpx.TimeoutException) else "connection_failed"
        raise ConnectionFailed(
            f"{call.method} {self.base_url}{call.path}: {_describe(error)}", type=kind
        ) from error

    def _retrying(self, call: Call, reason: str, attempt: int, wait: float) -> Retry:
        log.warning("%s %s: %s; retry %d of %d in %.2f s", call.method, call.path, reason,
                    attempt + 1, self.retry.retries, wait)  # fmt: skip
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
    ) -> Plan[schema.EmbedResponse]:
        """Embed any number of texts, `chunk_size` per request, as one `EmbedResponse`.

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
        return merge_embeddings(parts)

    def _embed_images(
        self,
        images: Sequence[ImageInput],
        task: str | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        progress: bool = False,
    ) -> Plan[schema.EmbedResponse]:
        """Embed any number of images (bytes, paths or PIL images), `chunk_size` per request,
        as one `EmbedResponse`; files are read one chunk at a time."""
        images = _images(images)
        if not images:
            raise ValueError("images: give at least one image")
        parts = []
        with _progress(progress, len(images), "embed") as bar:
            for chunk in chunks(images, chunk_size):
                parts.append((yield embed_call([], [image_bytes(i) for i in chunk], task)))
                bar.update(len(chunk))
        return merge_embeddings(parts)

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
    ) -> Plan[list[schema.IndexResponse]]:
        """Index any number of items, `chunk_size` per request; one `IndexResponse` per chunk.

        `items` may be a lazy iterable (a generator of `image_item`s reads each file only when
        its chunk is sent). The progress bar (tqdm, on stderr) shows only on a terminal.
        """
        _task(task)
        total = len(items) if isinstance(items, Sized) else None
        answers = []
        with _progress(progress, total, f"index {task}") as bar:
            for chunk in chunks(items, chunk_size):
                answers.append((yield index_call(task, [as_item(i) for i in chunk])))
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
    ) -> Plan[schema.SearchResponse]:
        """The `top_k` stored items nearest a text, an image or a vector (give exactly one).

        `filter` keeps items whose payload matches every key exactly. Searches compare only
        vectors of one prompt version: the serving one, or with `accept_mismatch` the query is
        embedded with the newest loaded version even if the stored vectors are older.
        """
        query = schema.SearchQuery(
            text=text,
            image=None if image is None else _b64(image_bytes(image)),
            vector=None if vector is None else [float(v) for v in vector],
        )
        body = schema.SearchRequest(
            task=task, query=query, top_k=top_k, filter=filter, accept_mismatch=accept_mismatch
        )
        return (yield Call("POST", "/search", schema.SearchResponse.model_validate_json, body=body))

    def _list_tasks(self) -> Plan[schema.TaskList]:
        """Every loaded task (`.tasks`: a `TaskInfo` each)."""
        return (yield Call("GET", "/tasks", schema.TaskList.model_validate_json))

    def _get_task(self, task: str) -> Plan[schema.TaskInfo]:
        """One loaded task's versions, shape and vector count; `NotFoundError` if not loaded."""
        return (yield Call("GET", f"/tasks/{_task(task)}", schema.TaskInfo.model_validate_json))

    def _load_task(
        self,
        task: str,
        path_or_bytes: str | os.PathLike | bytes | None = None,
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
            data = (
                bytes(path_or_bytes)
                if isinstance(path_or_bytes, (bytes, bytearray, memoryview))
                else Path(path_or_bytes).read_bytes()
            )
            call = Call("PUT", path, parse, content=data, params={"promote": promote}, admin=True)
        return (yield call)

    def _promote(self, task: str, version: str) -> Plan[schema.TaskInfo]:
        """Make a loaded prompt version the one /search uses (after re-indexing under it)."""
        body = schema.PromoteRequest(version=version)
        call = Call(
            "POST",
            f"/tasks/{_task(task)}/promote",
            schema.TaskInfo.model_validate_json,
            body=body,
            admin=True,
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


# -- building calls -----------------------------------------------------------------------------


def embed_call(texts: list[str], images: list[bytes], task: str | None) -> Call:
    """JSON for texts alone; a multipart form (files, not base64) once there are images."""
    parse = schema.EmbedResponse.model_validate_json
    if task is not None:
        _task(task)
    if not images:
        return Call("POST", "/embed", parse, body=schema.EmbedRequest(task=task, texts=texts))
    form: dict[str, Any] = {"texts": texts} | ({"task": task} if task is not None else {})
    files = tuple(
        ("images", (f"image-{i}", blob, "application/octet-stream"))
        for i, blob in enumerate(images)
    )
    return Call("POST", "/embed", parse, form=form, files=files)


def index_call(task: str, items: list[schema.IndexItem]) -> Call:
    items = [
        item if item.id is not None else item.model_copy(update={"id": str(uuid.uuid4())})
        for item in items
    ]
    body = schema.IndexRequest(task=task, items=items)
    return Call("POST", "/index", schema.IndexResponse.model_validate_json, body=body)


def text_item(
    text: str, id: str | None = None, payload: Mapping[str, schema.PayloadValue] | None = None
) -> schema.IndexItem:
    """An item to index from a text."""
    return schema.IndexItem(id=id, text=text, payload=dict(payload or {}))


def image_item(
    image: ImageInput,
    id: str | None = None,
    payload: Mapping[str, schema.PayloadValue] | None = None,
) -> schema.IndexItem:
    """An item to index from an image: file bytes, a local path or a PIL image."""
    return schema.IndexItem(id=id, image=_b64(image_bytes(image)), payload=dict(payload or {}))


def as_item(item: ItemInput) -> schema.IndexItem:
    if isinstance(item, schema.IndexItem):
        return item
    if isinstance(item, Mapping):
        return schema.IndexItem.model_validate(item)
    raise TypeError(f"an item is an IndexItem or a dict, not {type(item).__name__}")


def image_bytes(image: ImageInput) -> bytes:
    """An image's file bytes, from bytes, a local file path, or a PIL image (saved as PNG)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    # A PIL image can exist only if PIL is loaded already; never import it for the check.
    pil = sys.modules.get("PIL.Image")
    if pil is not None and isinstance(image, pil.Image):
        buffer = io.BytesIO()
        (image if image.mode in _PNG_MODES else image.convert("RGB")).save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"an image is bytes, a file path or a PIL image, not {type(image).__name__}")


# -- reading answers ----------------------------------------------------------------------------


def merge_embeddings(parts: Sequence[schema.EmbedResponse]) -> schema.EmbedResponse:
    """One `EmbedResponse` from the answers to consecutive chunks, rows in order."""
    if len(parts) == 1:
        return parts[0]
    first, versions = parts[0], {}
    for part in parts:
        if part.backbone != first.backbone:
            raise VersionChangedError(
                "the server's backbone changed between chunks; embed again", type="version_changed"
            )
        for task, version in part.prompt_versions.items():
            if versions.setdefault(task, version) != version:
                raise VersionChangedError(
                    f"task {task!r} was reloaded between chunks (prompt versions "
                    f"{versions[task]} and {version}); embed again",
                    type="version_changed",
                    field="task",
                )
    single = {part.prompt_version for part in parts}
    return schema.EmbedResponse(
        task=first.task,
        prompt_version=single.pop() if len(single) == 1 else None,
        backbone=first.backbone,
        text_embeddings=_concat(part.text_embeddings for part in parts),
        image_embeddings=_concat(part.image_embeddings for part in parts),
        text_tasks=_concat(part.text_tasks for part in parts),
        image_tasks=_concat(part.image_tasks for part in parts),
        prompt_versions=versions,
    )


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    if size < 1:
        raise ValueError("chunk_size must be at least 1")
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _parse(call: Call, response: httpx.Response) -> Any:
    try:
        return call.parse(response.content)
    except (ValidationError, UnicodeDecodeError) as err:
        raise InvalidResponseError(
            f"{call.method} {call.path}: the answer is not the wire schema's ({err})",
            status=response.status_code,
            type="invalid_response",
            body=response.content.decode("utf-8", "replace")[:2000],
        ) from err


def _text(content: bytes) -> str:
    return content.decode("utf-8")


def _concat(lists: Iterable[list | None]) -> list | None:
    present = [rows for rows in lists if rows is not None]
    return [row for rows in present for row in rows] if present else None


def _task(task: str) -> str:
    if not schema.is_task_name(task):
        raise ValueError(f"task: {task!r} is not a task name (lowercase letters, digits, '_.-')")
    return task


def _texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts: give a list of strings, not one string")
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("texts: every text must be a string")
    return texts


def _images(images: Sequence[ImageInput]) -> list[ImageInput]:
    if isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike)):
        raise TypeError("images: give a list of images, not one image")
    return list(images)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


class _NoBar:
    def update(self, n: int) -> None:
        pass


@contextmanager
def _progress(enabled: bool, total: int | None, desc: str) -> Iterator[Any]:
    """A tqdm bar on stderr (only on a terminal), or one that does nothing."""
    if not enabled:
        yield _NoBar()
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="item", disable=None) as bar:
        yield bar
