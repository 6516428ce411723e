"""server.testing.ServerProcess: the one way tests and benchmarks run `python -m server`.

A real process each (about 5-15 s of imports on a busy 2-core machine): one that cannot start
fails fast with its own log in the message; one that lost its port to another process before
binding it is started again on another port, then stops cleanly on SIGTERM.
"""

from __future__ import annotations

import os
import socket

import httpx
import pytest

import lpi
from server import testing
from server.testing import ServerProcess, ServerStartError

CLEAN_STOP = -15  # uvicorn drains on SIGTERM, then raises the signal again


def test_a_server_that_cannot_start_fails_with_its_log(tmp_path):
    missing = tmp_path / "missing.safetensors"
    server = ServerProcess(["--backbone", str(missing), "--data-dir", str(tmp_path / "data")])
    with pytest.raises(ServerStartError, match="exited with") as failed:
        server.start()
    assert "missing.safetensors" in str(failed.value)  # the server's own error, from its log
    assert not server.log_path.exists()  # a log it made itself is removed at stop
    assert server.stop() is not None and server.kill() is not None  # both idempotent


def test_a_port_taken_before_the_bind_is_retried_then_stopped_cleanly(tmp_path, monkeypatch):
    with socket.socket() as taken:
        taken.bind((testing.HOST, 0))
        taken.listen()
        ports = iter([taken.getsockname()[1]])
        real = testing.free_port
        monkeypatch.setattr(testing, "free_port", lambda: next(ports, None) or real())
        backbone = lpi.save_backbone(lpi.load_backbone("tiny"), tmp_path / "tiny.safetensors")
        args = [
            "--backbone",
            str(backbone),
            "--data-dir",
            str(tmp_path / "data"),
            "--store",
            "memory",
        ]
        log = tmp_path / "server.log"
        with ServerProcess(args, log_path=log) as server:
            assert server.port != taken.getsockname()[1]
            assert httpx.get(f"{server.url}/readyz", trust_env=False).status_code == 200
            pid = server.pid
    assert server.returncode == CLEAN_STOP
    assert log.read_text().strip()  # the first attempt's refusal stays in the given log
    with pytest.raises(ProcessLookupError):  # gone, not left behind
        os.kill(pid, 0)
