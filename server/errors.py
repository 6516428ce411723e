"""The one place exceptions become HTTP: a table from exception type to status and error code.

Every layer raises its own domain exceptions, each saying what went wrong and, in `field`,
which request field is at fault: `server.exceptions` (requests), `server.registry.errors`,
`server.store` and `export.errors`. None of them carries a status; `REFUSALS` below gives each
type its status and code (the most specific class in an exception's MRO wins), and every
answer is a JSON `ErrorBody`. Every 4xx names a field (`body` when the body as a whole is at
fault); nothing is recovered by reading a message.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from export.errors import ArtifactError
from server import exceptions as ex
from server.batcher import BatcherClosedError, QueueFullError
from server.registry import errors as reg
from server.store import contract as store

log = logging.getLogger("server.errors")


class Refusal(NamedTuple):
    status: int
    code: str
    retry_after: float | None = None  # seconds, when the exception has no `retry_after`


REFUSALS: dict[type[Exception], Refusal] = {
    # the server's own checks of a request
    ex.RequestError: Refusal(422, "invalid_request"),
    ex.InvalidRequestError: Refusal(422, "invalid_request"),
    ex.InvalidBase64Error: Refusal(422, "invalid_base64"),
    ex.InvalidImageError: Refusal(422, "invalid_image"),
    ex.InvalidTextError: Refusal(422, "invalid_text"),
    ex.EmptyBatchError: Refusal(422, "empty_batch"),
    ex.InvalidVectorError: Refusal(422, "invalid_vector"),
    ex.WrongDimensionError: Refusal(422, "wrong_dimension"),
    ex.UnusableVectorError: Refusal(422, "unusable_vector"),
    ex.ReservedNameError: Refusal(422, "reserved_name"),
    ex.InvalidPathError: Refusal(422, "invalid_path"),
    ex.NoSuchArtifactError: Refusal(404, "no_such_artifact"),
    ex.TooManyItemsError: Refusal(413, "too_many_items"),
    ex.ImageTooLargeError: Refusal(413, "image_too_large"),
    ex.TextTooLongError: Refusal(413, "text_too_long"),
    ex.NoTaskKeysError: Refusal(409, "no_task_keys"),
    ex.ModelTimeoutError: Refusal(503, "timeout"),
    ex.MissingKeyError: Refusal(401, "unauthorized"),
    ex.WrongKeyError: Refusal(403, "forbidden"),
    # task versions
    reg.RegistryError: Refusal(409, "conflict"),
    reg.TaskNotLoadedError: Refusal(404, "unknown_task"),
    reg.InvalidTaskNameError: Refusal(422, "invalid_request"),
    reg.VersionNotLoadedError: Refusal(409, "version_not_loaded"),
    reg.VersionNotIndexedError: Refusal(409, "version_not_indexed"),
    reg.TaskBusyError: Refusal(409, "task_busy"),
    reg.InvalidArtifactError: Refusal(422, "invalid_artifact"),
    ArtifactError: Refusal(422, "invalid_artifact"),
    # the vector store
    store.StoreError: Refusal(503, "store_unavailable"),
    store.InvalidInputError: Refusal(422, "invalid_input"),
    store.UnknownTaskError: Refusal(404, "unknown_task"),
    store.UnknownVersionError: Refusal(409, "version_not_indexed"),
    store.ConflictError: Refusal(409, "conflict"),
    # the batcher
    QueueFullError: Refusal(503, "overloaded"),
    BatcherClosedError: Refusal(503, "shutting_down", retry_after=1),
}

# Starlette's own refusals (no route, wrong method, an unreadable multipart body).
_HTTP = {
    400: ("invalid_request", "body"),
    404: ("not_found", "path"),
    405: ("method_not_allowed", "method"),
    413: ("body_too_large", "body"),
}


def refusal_of(err: BaseException) -> Refusal | None:
    """The table's entry for the most specific class of `err`, or None (a 500)."""
    for cls in type(err).__mro__:
        if cls in REFUSALS:
            return REFUSALS[cls]
    return None


def retry_headers(err: BaseException, refusal: Refusal) -> dict[str, str] | None:
    """`Retry-After` in whole seconds (at least 1), from the exception or else the table."""
    retry = getattr(err, "retry_after", None) or refusal.retry_after
    return {"Retry-After": str(max(1, round(retry)))} if retry else None


def error_response(
    status: int, kind: str, message: str, field: str | None = None, headers: dict | None = None
) -> JSONResponse:
    body = {"error": {"type": kind, "message": message, "field": field}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    async def _domain(request: Request, err: Exception):
        refusal = refusal_of(err)
        if refusal is None:  # registered types are all in the table; kept for safety
            return await _unexpected(request, err)
        if refusal.status >= 500:
            log.warning("%s on %s %s: %s", refusal.code, request.method, request.url.path, err)
        field = getattr(err, "field", None)
        return error_response(
            refusal.status, refusal.code, str(err), field, retry_headers(err, refusal)
        )

    for cls in REFUSALS:
        app.add_exception_handler(cls, _domain)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        errors = err.errors() or [{"type": "invalid", "loc": (), "msg": "invalid request"}]
        message = "; ".join(f"{field_of_error(e)}: {_message(e)}" for e in errors[:5])
        return error_response(422, "invalid_request", message, field_of_error(errors[0]))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        kind, field = _HTTP.get(err.status_code, ("http_error", "body"))
        return error_response(err.status_code, kind, str(err.detail), field, err.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal error; see the server log")


def field_of(location: tuple | list) -> str | None:
    """('body', 'items', 3, 'text') -> 'items[3].text'; ('body', 'query') -> 'query' (the
    search's field: only the first element says where a parameter came from)."""
    parts = list(location)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


def field_of_error(error: dict) -> str:
    """The field of one pydantic error: its location, extended by the `field` a model-level
    validator puts in its context (`wire.schema`); `body` for the body as a whole."""
    if error.get("type") == "json_invalid":
        return "body"  # FastAPI's location is ('body', <character position>): not a field
    field = field_of(error.get("loc", ()))
    named = (error.get("ctx") or {}).get("field")
    if named:
        field = f"{field}.{named}" if field else named
    return field or "body"


def _message(error: dict) -> str:
    """Pydantic's message; for a JSON syntax error, where it is (FastAPI gives the position)."""
    if error.get("type") != "json_invalid":
        return str(error.get("msg"))
    location = error.get("loc", ())
    reason = (error.get("ctx") or {}).get("error") or error.get("msg")
    if len(location) > 1 and isinstance(location[1], int):
        return f"not valid JSON at character {location[1]}: {reason}"
    return f"not valid JSON: {reason}"
