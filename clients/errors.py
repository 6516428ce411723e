"""The SDK's exceptions: one per kind of failure, each carrying the server's `ErrorBody`.

LpiError                      status, type, message, field, body
├── BadRequestError           any other 4xx (422 invalid input, 413 too large, ...)
│   ├── AuthError             401 no key, 403 wrong key
│   ├── NotFoundError         404 (unknown task, no such artifact)
│   └── ConflictError         409 (version not loaded or not indexed, no task keys)
├── ServerError               5xx other than 503; never retried
│   └── OverloadedError       503 still answered after every retry (queue full, store down)
├── ConnectionFailed          no answer: refused, reset or timed out (after every safe retry)
├── VersionChangedError       chunks of one call were answered by different prompt versions
└── InvalidResponseError      a 2xx body that does not parse as the wire schema
"""

from __future__ import annotations

from email.utils import parsedate_to_datetime
from time import time
from typing import Any

from pydantic import ValidationError

from wire import schema


class LpiError(Exception):
    """A failed call: the HTTP status (None when no answer came), the server's error kind,
    message and field at fault, and the raw body (parsed JSON, or text)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str = "error",
        field: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.field, self.body = (
            status,
            type,
            message,
            field,
            body,
        )

    def __str__(self) -> str:
        head = f"{self.status} {self.type}" if self.status is not None else self.type
        field = f" (field: {self.field})" if self.field else ""
        return f"{head}: {self.message}{field}"


class BadRequestError(LpiError):
    """4xx: the request was refused; sending it again will not help."""


class AuthError(BadRequestError):
    """401 (no key given) or 403 (wrong key; admin calls need the admin key)."""


class NotFoundError(BadRequestError):
    """404: an unknown task, or no such artifact in the server's artifact directory."""


class ConflictError(BadRequestError):
    """409: the task's state refuses the call (e.g. the searched version is not loaded)."""


class ServerError(LpiError):
    """5xx: the server failed."""


class OverloadedError(ServerError):
    """503 after every retry; `retry_after` is the server's last hint in seconds, if any."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ConnectionFailed(LpiError):
    """No HTTP answer: the connection was refused or reset, or timed out, after every retry
    that was safe (a load or delete whose answer was lost is not sent again: it may have
    happened, and the message says so)."""


class VersionChangedError(LpiError):
    """A chunked call's chunks were embedded by different prompt versions of one task (a new
    version was loaded meanwhile), so its vectors are not comparable; call it again."""


class InvalidResponseError(LpiError):
    """A success status whose body is not the wire schema's answer (a proxy, or a version skew)."""


_BY_STATUS: dict[int, type[LpiError]] = {
    401: AuthError,
    403: AuthError,
    404: NotFoundError,
    409: ConflictError,
    503: OverloadedError,
}


def error_from_response(status: int, content: bytes, headers: Any) -> LpiError:
    """The exception for a refused request, from its status and `ErrorBody` (or any body)."""
    cls = _BY_STATUS.get(status) or (
        BadRequestError if 400 <= status < 500 else ServerError if status >= 500 else LpiError
    )
    try:
        detail = schema.ErrorBody.model_validate_json(content).error
        kind, message, field = detail.type, detail.message, detail.field
        body: Any = {"error": detail.model_dump()}
    except ValidationError:
        # Not ours (a proxy's page, a bare 502): keep the start of whatever came back.
        text = content.decode("utf-8", "replace").strip()
        kind, message, field, body = "http_error", text[:500] or f"HTTP {status}", None, text
    kwargs: dict[str, Any] = {"status": status, "type": kind, "field": field, "body": body}
    if cls is OverloadedError:
        kwargs["retry_after"] = parse_retry_after(headers.get("retry-after"))
    return cls(message, **kwargs)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time())
    except (TypeError, ValueError, IndexError):
        return None
