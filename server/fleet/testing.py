"""`python -m server.fleet` as a real process, for tests and benchmarks: start, wait, stop.

Like `server.testing.ServerProcess`: a free loopback port, the fleet's log in a file, /readyz
polled until 200 (failing fast with the log's tail when the process exits first), SIGTERM to
stop (the fleet shuts Ray Serve and its local Ray cluster down), SIGKILL if it hangs.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from server.testing import HOST, ROOT, ServerStartError, free_port

START_TIMEOUT_S = 180.0  # Ray, its proxy and the replicas importing torch on busy cores
STOP_TIMEOUT_S = 60.0


class FleetProcess:
    """`python -m server.fleet ARGS --host 127.0.0.1 --port P`; a context manager."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        log_path: Path | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self.args, self.start_timeout_s = list(args), start_timeout_s
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="lpi-fleet-", suffix=".log")[1])
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> FleetProcess:
        argv = [
            sys.executable,
            "-m",
            "server.fleet",
            *self.args,
            "--host",
            HOST,
            "--port",
            str(self.port),
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        started = time.monotonic()
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while time.monotonic() - started < self.start_timeout_s:
                if self.process.poll() is not None:
                    raise ServerStartError(f"the fleet exited: {self.log_tail()}")
                try:
                    if client.get("/readyz").status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        self.stop()
        raise ServerStartError(
            f"the fleet was not ready in {self.start_timeout_s:g} s: {self.log_tail()}"
        )

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> FleetProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
