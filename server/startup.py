"""Starting in the background, so the port answers at once while the demo bundle builds.

Until the service is up, `/healthz` answers 200, `/readyz` answers 503 saying what is being
built and how far it is, and every other route answers 503 `starting` with Retry-After
(`StartingGate`). The work runs in a daemon thread with a `Control`: shutdown (Ctrl-C,
SIGTERM) sets its cancel event, the build stops within one training step and removes its
unfinished folder, and the process is not held up by it for more than `STOP_WAIT_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from lpi.continual.control import Cancelled, Control
from server.errors import error_response

log = logging.getLogger("server.startup")

STOP_WAIT_S = 1.5  # how long shutdown waits for the build thread to stop and clean up
OPEN_PATHS = frozenset(
    {
        "/",
        "/healthz",
        "/readyz",
        "/metrics",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
        "/ui",
    }
)
OPEN_PREFIX = "/static/"  # the docs' and the search page's scripts: package data


class Startup:
    """What the server is doing before it can serve: a label, a fraction done, or a failure."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.ready = False
        self.building: str | None = "starting"
        self.progress: float | None = 0.0
        self.error: str | None = None
        self.on_failure: Callable[[], None] | None = None  # `python -m server` stops uvicorn
        self._started = time.monotonic()
        self._thread: threading.Thread | None = None

    @property
    def control(self) -> Control:
        return Control(cancel=self.cancel, report=self.report)

    def report(self, label: str, fraction: float) -> None:
        self.building, self.progress = label, round(fraction, 3)

    def finish(self) -> None:
        self.ready, self.building, self.progress = True, None, None
        log.info("ready after %.1f s", time.monotonic() - self._started)

    def fail(self, error: BaseException) -> None:
        self.error, self.building, self.progress = f"{type(error).__name__}: {error}", None, None
        log.error("start-up failed: %s", self.error, exc_info=error)
        if self.on_failure is not None:
            self.on_failure()

    def describe(self) -> str:
        if self.error is not None:
            return f"the server failed to start ({self.error}); see its log"
        percent = f" ({100 * self.progress:.0f}%)" if self.progress is not None else ""
        return f"the server is starting: {self.building}{percent}"

    def retry_after(self) -> int:
        """Seconds until ready, guessed from the time spent and the fraction done (1-60)."""
        elapsed = time.monotonic() - self._started
        if not self.progress or self.progress < 0.05:
            return 10
        return max(1, min(60, round(elapsed * (1 - self.progress) / self.progress)))

    async def run_in_thread(self, function: Callable, *args):
        """`function(*args)` in a daemon thread (never holds up the process's exit), awaited."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle(method, value) -> None:
            if not future.done():
                method(value)

        def deliver(method, value) -> None:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(settle, method, value)

        def target() -> None:
            try:
                result = function(*args)
            except BaseException as error:  # handed to the awaiting task
                deliver(future.set_exception, error)
            else:
                deliver(future.set_result, result)

        self._thread = threading.Thread(target=target, name="lpi-startup", daemon=True)
        self._thread.start()
        return await future

    async def stop(self, task: asyncio.Task) -> None:
        """Cancel the start-up and wait (at most STOP_WAIT_S) for its thread to clean up."""
        self.cancel.set()
        if not task.done():
            task.cancel()
        deadline = time.monotonic() + STOP_WAIT_S
        while self._thread is not None and self._thread.is_alive():
            if time.monotonic() > deadline:
                log.warning(
                    "the start-up did not stop within %.1f s (a step still running); exiting "
                    "anyway: the next build removes what it left",
                    STOP_WAIT_S,
                )
                break
            await asyncio.sleep(0.02)
        try:
            await task
        except (Cancelled, asyncio.CancelledError):
            log.info("start-up cancelled")
        except Exception:  # raised by the lifespan already, or reported by fail()
            log.debug("start-up had failed", exc_info=True)


class StartingGate:
    """Pure ASGI: 503 with Retry-After for every route but health, metrics and docs until the
    service is up (`start_failed`, without Retry-After, if it never will be)."""

    def __init__(self, app: ASGIApp, startup: Startup) -> None:
        self.app, self.startup = app, startup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        startup = self.startup
        path = scope.get("path", "")
        is_open = path in OPEN_PATHS or path.startswith(OPEN_PREFIX)
        if scope["type"] != "http" or startup.ready or is_open:
            await self.app(scope, receive, send)
            return
        if startup.error is not None:
            response = error_response(503, "start_failed", startup.describe())
        else:
            headers = {"Retry-After": str(startup.retry_after())}
            response = error_response(503, "starting", startup.describe(), None, headers)
        await response(scope, receive, send)
