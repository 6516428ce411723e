"""Pure ASGI middleware: request body limits, and metrics per route and task.

Pure ASGI (not BaseHTTPMiddleware) so request bodies stream through untouched and no extra task
is spawned per request.
"""

from __future__ import annotations

import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_response
from server.metrics import NO_TASK, Metrics


class BodyTooLarge(HTTPException):
    """Raised from `receive`: an HTTPException, so a route reading its body answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds {limit} bytes")


class BodyLimit:
    """413 for bodies over the limit: at once by Content-Length, else while streaming."""

    def __init__(self, app: ASGIApp, default_limit: int, upload_limit: int) -> None:
        self.app, self.default_limit, self.upload_limit = app, default_limit, upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit if _is_upload(scope) else self.default_limit
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _too_large(scope, receive, send, limit)
            return
        received, started = 0, False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _too_large(scope, receive, send, limit)


def _is_upload(scope: Scope) -> bool:
    return scope["method"] == "PUT" and scope["path"].startswith("/tasks/")


async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    message = f"the request body exceeds {limit} bytes"
    await error_response(413, "body_too_large", message, "body")(scope, receive, send)


class RequestMetrics:
    """Counts and times every request by route template, loaded task and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics, is_loaded) -> None:
        self.app, self.metrics, self.is_loaded = app, metrics, is_loaded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            if path != "/metrics":
                task = scope.get("state", {}).get("task")
                label = task if isinstance(task, str) and self.is_loaded(task) else NO_TASK
                self.metrics.requests.labels(path, label, str(status)).inc()
                self.metrics.latency.labels(path, label).observe(time.perf_counter() - started)
