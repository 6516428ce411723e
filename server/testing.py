"""`python -m server` as a real process for tests and benchmarks: start, wait, stop, one way.

A real process, not an app in a thread, where it matters: a benchmark's client must not share
the server's GIL, a fault test must SIGKILL it, a soak must read its memory. `ServerProcess`
picks a free loopback port, starts the server with the caller's flags and environment, waits
for GET /readyz to answer 200 (failing fast, with the server's log, when it exits first), and
stops it with SIGTERM (uvicorn drains) and then SIGKILL.

It lives in the `server` package so tests and benchmark scripts import it the same way
(`from server.testing import ServerProcess`) without either importing the other's folder, and
the process runs this very package (`cwd` is the folder that holds it). It imports httpx and
the standard library only: no torch, no app, so a load-driving process stays light.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
START_TIMEOUT_S = 180.0  # torch and qdrant imports take 5-15 s alone on a busy 2-core machine
STOP_TIMEOUT_S = 20.0  # uvicorn's graceful shutdown is 10 s (server.__main__)
POLL_S = 0.1
PORT_ATTEMPTS = 3  # a free port can be taken between the probe and the server's bind
ROOT = Path(__file__).resolve().parents[1]  # the folder holding this `server` package


class ServerStartError(RuntimeError):
    """The server exited or was not ready in time; the message ends with its log's tail."""


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now (the OS picks it); free until someone binds it."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`python -m server ARGS --host 127.0.0.1 --port P` with its output in a log file.

    `args` are the server's flags without host and port; `env` entries override the
    environment. The log (stdout and stderr) goes to `log_path`, appended, so restarts on
    one file keep every run's lines; without one a temp file is used and removed at stop.
    Use as a context manager (`with ServerProcess(args) as server: server.url`), or call
    `start()` and `stop()` / `kill()`.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ) -> None:
        self.args, self.env = list(args), {**os.environ, **(env or {})}
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        self.own_log = log_path is None  # a temp file, made at start and removed at stop
        self.log_path = None if log_path is None else Path(log_path)
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.url = ""

    @property
    def pid(self) -> int:
        return self._running().pid

    @property
    def returncode(self) -> int | None:
        """None while running; after a stop, -15 (SIGTERM, a clean stop) or -9 (killed)."""
        return None if self.process is None else self.process.poll()

    def start(self) -> ServerProcess:
        """Start and wait for /readyz; ServerStartError (log tail included) if it cannot."""
        if self.process is not None:
            raise RuntimeError("this ServerProcess was already started")
        if self.log_path is None:
            handle, name = tempfile.mkstemp(prefix="lpi-server-", suffix=".log")
            os.close(handle)
            self.log_path = Path(name)
        attempt = 1
        while True:
            self._spawn()
            try:
                self._wait_ready()
                return self
            except ServerStartError:
                self.stop(remove_log=False)
                if attempt == PORT_ATTEMPTS or not self._lost_port_race():
                    self._remove_own_log()
                    raise
            log.warning("port %d was taken before the server bound it; retrying", self.port)
            attempt += 1

    def stop(self, *, remove_log: bool = True) -> int | None:
        """SIGTERM, then SIGKILL after `stop_timeout_s`; the exit code (None if never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("the server did not stop in %.0f s: killed", self.stop_timeout_s)
                self.process.kill()
                self.process.wait(self.stop_timeout_s)
        if remove_log:
            self._remove_own_log()
        return self.process.returncode

    def kill(self) -> int | None:
        """SIGKILL at once (a crash, for fault tests); the exit code (None if never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.kill()
        return self.process.wait(self.stop_timeout_s)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = "" if self.log_path is None else self.log_path.read_text(errors="replace")
        except OSError:  # a temp log removed at stop
            text = ""
        if not text:
            return "(the server wrote no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- inside -----------------------------------------------------------------------------

    def _spawn(self) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        argv = [sys.executable, "-m", "server", *self.args]
        argv += ["--host", HOST, "--port", str(self.port)]
        with open(self.log_path, "ab") as out:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def _wait_ready(self) -> None:
        process = self._running()
        deadline = time.monotonic() + self.start_timeout_s
        with httpx.Client(timeout=5.0, trust_env=False) as http:  # loopback: never a proxy
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise ServerStartError(
                        f"the server exited with {process.returncode} before it was ready; "
                        f"its log ({self.log_path}) ends:\n{self.log_tail()}"
                    )
                try:
                    if http.get(f"{self.url}/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass  # not listening yet
                time.sleep(POLL_S)
        raise ServerStartError(
            f"the server was not ready after {self.start_timeout_s:.0f} s; its log "
            f"({self.log_path}) ends:\n{self.log_tail()}"
        )

    def _lost_port_race(self) -> bool:
        """Whether another process holds the port now that this server has exited."""
        with socket.socket() as probe:
            try:
                probe.bind((HOST, self.port))
            except OSError:
                return True
        return False

    def _running(self) -> subprocess.Popen:
        if self.process is None:
            raise RuntimeError("the server was not started")
        return self.process

    def _remove_own_log(self) -> None:
        if self.own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
