"""Every failure leaves as a JSON `ErrorBody` that names the field at fault, with the right status.

The map from exceptions of the layers below (store, registry, batcher, validation) to HTTP lives
here and only here, so routes raise plain exceptions and never build error responses.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.batcher import BatcherClosedError, QueueFullError
from server.registry import RegistryError
from server.store import ConflictError, InvalidInputError, StoreError, UnknownTaskError
from server.store import UnknownVersionError as StoreUnknownVersionError

log = logging.getLogger("server.errors")


class ApiError(Exception):
    """A refusal with its status, a stable kind, and the field at fault."""

    def __init__(self, status: int, kind: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.field = status, kind, field


def error_response(
    status: int, kind: str, message: str, field: str | None = None, headers: dict | None = None
) -> JSONResponse:
    body = {"error": {"type": kind, "message": message, "field": field}}
    return JSONResponse(body, status_code=status, headers=headers)


def field_of(location: tuple | list) -> str | None:
    """('body', 'items', 3, 'text') -> 'items[3].text'."""
    parts = [p for p in location if p not in ("body", "query", "path", "header")]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


_HTTP_KINDS = {
    400: ("invalid_request", "body"),
    404: ("not_found", None),
    405: ("method_not_allowed", None),
    413: ("body_too_large", "body"),
}

_STORE_STATUS = (
    (InvalidInputError, 422, "invalid_input"),
    (UnknownTaskError, 404, "unknown_task"),
    (StoreUnknownVersionError, 409, "version_not_indexed"),
    (ConflictError, 409, "conflict"),
)


def install_error_handlers(app: FastAPI) -> None:
    async def _refusal(request: Request, err: ApiError | RegistryError):
        return error_response(err.status, err.kind, str(err), err.field)

    app.add_exception_handler(ApiError, _refusal)  # both carry status, kind and field
    app.add_exception_handler(RegistryError, _refusal)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        field = field_of(first.get("loc", ())) or _named_in(first.get("msg", ""), first)
        message = "; ".join(
            f"{field_of(e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in err.errors()[:5]
        )
        return error_response(422, "invalid_request", message, field)

    @app.exception_handler(StoreError)
    async def _store(request: Request, err: StoreError):
        for cls, status, kind in _STORE_STATUS:
            if isinstance(err, cls):
                return error_response(status, kind, str(err), _store_field(err))
        log.error("store failure: %s", err)
        return error_response(503, "store_unavailable", str(err))

    @app.exception_handler(QueueFullError)
    async def _full(request: Request, err: QueueFullError):
        headers = {"Retry-After": str(max(1, round(err.retry_after)))}
        return error_response(503, "overloaded", str(err), None, headers)

    @app.exception_handler(BatcherClosedError)
    async def _closed(request: Request, err: BatcherClosedError):
        return error_response(503, "shutting_down", str(err), None, {"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        kind, field = _HTTP_KINDS.get(err.status_code, ("http_error", None))
        return error_response(err.status_code, kind, str(err.detail), field, err.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal error; see the server log")


_STORE_FIELDS = {
    "dim": "query.vector",
    "vector": "query.vector",
    "version": "task",
    "filter": "filter",
    "ids": "items",
    "payloads": "items",
    "top_k": "top_k",
}


def _named_in(message: str, error: dict) -> str | None:
    """A model-level validator names its field first: 'Value error, texts: ...'."""
    head = message.removeprefix("Value error, ").split(":", 1)[0]
    if not head.replace("_", "").isalnum():
        return None
    parent = field_of(error.get("loc", ()))
    if parent is None or parent.endswith(head):
        return parent or head
    return f"{parent}.{head}"


def _store_field(err: StoreError) -> str | None:
    """The store's messages start with the argument at fault ('dim: ...', 'ids[3]: ...')."""
    head = str(err).split(":", 1)[0].strip()
    name, _, index = head.partition("[")
    field = _STORE_FIELDS.get(name)
    if field == "items" and index:
        return f"items[{index}" + (".payload" if name == "payloads" else ".id")
    return field
