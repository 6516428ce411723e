"""Calls as data: building each request of the SDK and reading its answer, with no I/O.

`clients.base` composes these into plans; `Client` and `AsyncClient` only send them. Also the
item helpers (`text_item`, `image_item`) and `to_numpy`, which turns embeddings into arrays.
"""

from __future__ import annotations

import base64
import io
import os
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from clients.errors import InvalidResponseError, VersionChangedError, parse_retry_after
from wire import schema

T = TypeVar("T")
# bytes of an image file, a local file path, or a PIL image (PIL is never imported here).
ImageInput = bytes | bytearray | memoryview | str | os.PathLike[str] | Any
ItemInput = schema.IndexItem | Mapping[str, Any]
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
# Ray Serve's model multiplexing header: the fleet's proxy prefers replicas holding the task.
TASK_ROUTING_HEADER = "serve_multiplexed_model_id"


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
    # Sending it twice does what sending it once does, and answers the same: a lost answer (a
    # reset, a read timeout, a proxy's 500) may hide a first success, so only such calls (and
    # every GET) are sent again after one. A load answers `changed: False` the second time, an
    # unload no versions: not idempotent.
    idempotent: bool = False

    @property
    def repeatable(self) -> bool:
        """Whether a lost answer (no answer after sending, or a 500 the server did not write)
        may be answered by sending the call again."""
        return self.idempotent or self.method == "GET"


# -- building calls -----------------------------------------------------------------------------


def embed_call(texts: list[str], images: list[bytes], task: str | None) -> Call:
    """JSON for texts alone; a multipart form (files, not base64) once there are images."""
    parse = schema.EmbedResponse.model_validate_json
    if task is not None:
        _task(task)
    if not images:
        body = schema.EmbedRequest(task=task, texts=texts)
        return Call("POST", "/embed", parse, body=body, idempotent=True)
    form: dict[str, Any] = {"texts": texts} | ({"task": task} if task is not None else {})
    files = tuple(
        ("images", (f"image-{i}", blob, "application/octet-stream"))
        for i, blob in enumerate(images)
    )
    return Call("POST", "/embed", parse, form=form, files=files, idempotent=True)


def index_call(task: str, items: list[schema.IndexItem], **options: Any) -> Call:
    """`options`: IndexRequest's other fields (skip_existing, prompt_version, thumbnail).

    Every item gets an id here, not on the server: sent again, the call overwrites the same
    points rather than adding copies, so it is `idempotent`."""
    items = [
        item if item.id is not None else item.model_copy(update={"id": str(uuid.uuid4())})
        for item in items
    ]
    body = schema.IndexRequest(task=task, items=items, **options)
    parse = schema.IndexResponse.model_validate_json
    return Call("POST", "/index", parse, body=body, idempotent=True)


def search_call(body: schema.SearchRequest) -> Call:
    """A search only reads: `idempotent`."""
    parse = schema.SearchResponse.model_validate_json
    return Call("POST", "/search", parse, body=body, idempotent=True)


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
    first, versions = parts[0], dict[str, str]()
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


def _concat(lists: Iterable[list[Any] | None]) -> list[Any] | None:
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


# -- stored points and arrays -------------------------------------------------------------------


def points_call(
    action: str,
    task: str,
    filter: Mapping[str, Any] | None,
    limit: int = 100,
    offset: str | None = None,
) -> Call:
    given = None if filter is None else dict(filter)
    body = schema.PointsRequest(task=_task(task), filter=given, limit=limit, offset=offset)
    parse = schema.PointsResponse.model_validate_json  # count and list only read: idempotent
    return Call("POST", f"/points/{action}", parse, body=body, idempotent=True)


def delete_calls(
    task: str, ids: Sequence[str] | None, filter: Mapping[str, Any] | None
) -> Iterator[Call]:
    """One call for a filter; one per `MAX_TOP_K` ids."""
    parse = schema.PointsResponse.model_validate_json
    if (ids is None) == (filter is None):
        raise ValueError("delete_points: give exactly one of ids or filter")
    if isinstance(ids, str):
        raise TypeError("ids: give a list of ids, not one string")
    if filter is not None:
        body = schema.DeletePointsRequest(task=_task(task), filter=dict(filter))
        yield Call("POST", "/points/delete", parse, body=body)
        return
    for chunk in chunks(list(ids or []), schema.MAX_TOP_K):
        body = schema.DeletePointsRequest(task=_task(task), ids=chunk)
        yield Call("POST", "/points/delete", parse, body=body)


@dataclass(frozen=True)
class Arrays:
    """An `EmbedResponse`'s vectors as float32 arrays [n, E] (None where none were asked)."""

    text: Any
    image: Any


def to_numpy(response: schema.EmbedResponse) -> Arrays:
    """The embeddings as numpy arrays (numpy is imported only here: the SDK needs none)."""
    try:
        import numpy as np
    except ImportError:
        raise ImportError("numpy results need numpy: pip install numpy") from None

    def array(rows: list[list[float]] | None) -> Any:
        return None if rows is None else np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)

    return Arrays(array(response.text_embeddings), array(response.image_embeddings))


def worth_retrying(call: Call, response: httpx.Response) -> tuple[bool, float | None]:
    """Whether a refused call is worth sending again, and the answer's Retry-After: a 503, a
    409 with Retry-After (a fleet replica loading the task), or, for a `repeatable` call, a 500
    the server did not write (its errors are JSON `ErrorBody`): a proxy answering for a server
    process that died under the call, perhaps after it did the call's work, as Ray Serve's does."""
    hint = parse_retry_after(response.headers.get("retry-after"))
    status = response.status_code
    if status == 503 or (status == 409 and hint is not None):
        return True, hint
    if status != 500 or not call.repeatable:
        return False, None
    try:
        schema.ErrorBody.model_validate_json(response.content)
    except ValidationError:
        return True, None
    return False, None


# No answer came: worth another try. Other transport errors (a bad URL scheme, a proxy refusing
# us) would fail the same way again.
RETRYABLE = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
# Of those, the ones where the request never reached the server.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def safe_to_resend(call: Call, error: httpx.TransportError) -> bool | None:
    """After a call got no answer: True if sending it again is safe (the request never left,
    or the call is `repeatable`), False if the server may have done its work and a second send
    would answer differently (a load answering `changed: False`), None if another try would
    fail the same way."""
    if not isinstance(error, RETRYABLE):
        return None
    return call.repeatable or isinstance(error, NOT_SENT)


def routing_headers(call: Call) -> dict[str, str]:
    """The one task a call names (its body's or form's `task`) in the header a fleet's proxy
    routes by (replicas holding the task first); one server ignores it."""
    task = getattr(call.body, "task", None) if call.body is not None else None
    if task is None and call.form:
        task = call.form.get("task")
    ok = isinstance(task, str) and task != schema.AUTO
    return {TASK_ROUTING_HEADER: task} if ok and isinstance(task, str) else {}
