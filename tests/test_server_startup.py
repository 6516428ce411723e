"""`python -m server` as a real process: start-up errors as one line (exit 2, no traceback),
before any long work; one JSON log format for everything the process writes; the backbone's
source named in the log, GET / and /readyz; a model name served from a test-built cache."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.hub_cache import cache_repo, tiny_weights

REPO = Path(__file__).resolve().parents[1]
B32 = ("ViT-B-32:openai", "timm/vit_base_patch32_clip_224.openai")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LPI_", "HF_"))}
    hub = tmp_path / "hf-cache"
    hub.mkdir(exist_ok=True)
    return env | {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"} | extra


def _fails(tmp_path: Path, *args: str, env: dict | None = None, code: str | None = None) -> str:
    """Run the server expecting a start-up error; its one stderr line (text format)."""
    argv = ["--data-dir", str(tmp_path / "data"), "--store", "memory", *args]
    command = [sys.executable, "-m", "server", *argv, "--log-format", "text"]
    if code is not None:
        command = [
            sys.executable,
            "-c",
            code + f"\nfrom server.__main__ import main\n"
            f"raise SystemExit(main({[*argv, '--log-format', 'text']!r}))",
        ]
    out = subprocess.run(
        command, cwd=REPO, env=env or _env(tmp_path), capture_output=True, text=True, timeout=120
    )
    lines = out.stderr.splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("python -m server: error: "), lines[0]
    return lines[0]


def test_a_bad_setting_is_one_line(tmp_path):
    assert "--port / LPI_PORT" in _fails(tmp_path, "--port", "70000")
    assert "unrecognized arguments: --colour" in _fails(tmp_path, "--colour", "red")
    env = _env(tmp_path, LPI_MAX_BATCH_SIZE="0")
    assert "--max-batch-size / LPI_MAX_BATCH_SIZE" in _fails(tmp_path, env=env)


def test_random_weights_need_consent(tmp_path):
    line = _fails(tmp_path, "--backbone", "tiny")
    assert "random weights" in line and "--random-weights" in line


def test_the_port_is_checked_before_the_backbone(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # a missing model would fail too, later: the port, checked first, is what is reported
        line = _fails(tmp_path, "--port", str(port), "--backbone", "acme/missing")
    assert f"port {port} on 127.0.0.1 is taken" in line


def test_the_data_directory_names_its_owner(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "server.lock", "w") as held:  # as a running server holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(f"{os.getpid()}\n")
        held.flush()
        line = _fails(tmp_path, "--port", "0")
    assert f"{data} is in use by another server (pid {os.getpid()})" in line


def test_a_missing_extra_names_what_to_install(tmp_path):
    hide = "import sys\nsys.modules['qdrant_edge'] = None  # as if qdrant-edge-py were absent"
    line = _fails(tmp_path, "--port", "0", "--store", "edge", code=hide)
    assert "pip install 'lpi-serve[edge]'" in line


def test_a_model_missing_offline_says_how_to_fetch_it(tmp_path):
    line = _fails(tmp_path, "--port", "0", "--backbone", B32[0])
    assert "not in the Hugging Face cache" in line and f"hf download {B32[1]}" in line
    assert "unknown model 'ViT-B-99:openai'" in _fails(
        tmp_path, "--port", "0", "--backbone", "ViT-B-99:openai"
    )


def test_every_line_is_json_and_the_source_is_named(tmp_path):
    """Start (a model name from a test-built cache), a few requests, stop: every line stderr
    and stdout carry parses as JSON, uvicorn's access and error records included, and so does
    one whose message holds quotes, a newline and non-ASCII (the data directory's name)."""
    weights, data = tiny_weights(tmp_path, "open_clip_model.safetensors", seed=11)
    snapshot = cache_repo(tmp_path / "hf-cache", B32[1], {weights.name: data})
    data_dir = tmp_path / 'data "quoted"\nand ünïcødé ✓'
    command = [
        sys.executable,
        "-m",
        "server",
        "--backbone",
        B32[0],
        "--data-dir",
        str(data_dir),
        "--store",
        "memory",
        "--port",
        "0",
        "--threads",
        "1",
    ]
    process = subprocess.Popen(
        command, cwd=REPO, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    early: list[bytes] = []
    try:
        url = _wait_for_url(process, early)
        with httpx.Client(base_url=url, timeout=30) as client:
            ready = _wait_ready(client)
            index = client.get("/").json()
            assert client.get("/", headers={"Accept": "text/html"}).status_code == 307
            assert client.post("/embed", json={"texts": ["x"], "task": "nope"}).status_code == 404
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    source = {"kind": "hub", "name": B32[0], "detail": f"{B32[1]}@{snapshot.name[:12]} ({B32[0]})"}
    assert ready["backbone_source"] == source and index["backbone_source"] == source
    assert index["name"] == "lpi-serve" and index["links"]["docs"] == "/docs"
    assert stdout == b""
    lines = b"".join([*early, stderr]).decode("ascii").splitlines()  # non-ASCII is escaped
    records = [json.loads(line) for line in lines]
    by_logger = {r["logger"] for r in records}
    assert {"server", "uvicorn.error", "uvicorn.access"} <= by_logger, by_logger
    start = next(r for r in records if r["message"].startswith("starting on"))
    assert str(data_dir) in start["message"] and start["backbone_source"] == source
    access = [r for r in records if r["logger"] == "uvicorn.access"]
    assert {"path": "/embed", "status": 404} in [
        {k: r[k] for k in ("path", "status")} for r in access
    ]


def _wait_for_url(process: subprocess.Popen, lines: list[bytes], timeout: float = 120) -> str:
    """The address from the start-up record (port 0: the system chose it), read off stderr;
    the lines read are kept in `lines`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        lines.append(line)
        if not line:
            pytest.fail(f"the server exited ({process.wait()}) before it said where it listens")
        match = re.search(r"starting on (http://[\d.]+:\d+)", json.loads(line)["message"])
        if match:
            return match[1]
    pytest.fail("no start-up record")


def _wait_ready(client: httpx.Client, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = client.get("/readyz")
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail("the server never became ready")
