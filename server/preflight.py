"""Checks `python -m server` runs before any long work, each failing as one line (exit 2).

In order, cheapest first: the optional extras the settings need are installed; the data
directory is this process's alone (an advisory lock on `data_dir/server.lock`, which holds the
owner's pid so the next one can say who); the port is free (bound here and handed to uvicorn,
so nothing can take it in between); the backbone is where its name says (a model name is found
in the Hugging Face cache, fetched into it only with --allow-download, and hash-checked).
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import logging
import os
import socket
from pathlib import Path
from typing import IO

log = logging.getLogger("server.preflight")

LOCK_NAME = "server.lock"
# What `pip install 'lpi-serve[server]'` brings (import names).
_SERVER_MODULES = ("fastapi", "uvicorn", "pydantic_settings", "prometheus_client", "qdrant_client")


class PreflightError(Exception):
    """A start-up problem the operator can fix; str() is the whole one-line message."""


def check_server_extra() -> None:
    """The server's own dependencies (`pip install 'lpi-serve[server]'`)."""
    missing = [name for name in _SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise PreflightError(
            f"the server needs {', '.join(missing)}, which is not installed: "
            f"pip install 'lpi-serve[server]'"
        )


def check_extras(settings) -> None:
    """The extras this configuration needs (optional at install time)."""
    if settings.store == "edge" and importlib.util.find_spec("qdrant_edge") is None:
        raise PreflightError(
            "--store edge needs qdrant-edge-py, which is not installed: "
            "pip install 'lpi-serve[edge]'"
        )
    if settings.engine == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        raise PreflightError(
            "--engine onnx needs onnxruntime, which is not installed: "
            "pip install 'lpi-serve[onnx]' (or 'lpi-serve[onnx-gpu]' on CUDA)"
        )


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Hold `data_dir` for this process (released when it exits); who holds it if taken."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        handle = open(data_dir / LOCK_NAME, "a+")  # noqa: SIM115 - held for the process's life
    except OSError as err:
        raise PreflightError(
            f"data directory {data_dir} is not writable ({err.strerror or err}): give a "
            f"writable folder with --data-dir / LPI_DATA_DIR"
        ) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise PreflightError(
            f"data directory {data_dir} is in use by another server (pid {owner}); stop it or "
            f"give this one its own --data-dir / LPI_DATA_DIR"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (as uvicorn binds one), or why it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise PreflightError(
                f"port {port} on {host} is taken by another process; choose another with "
                f"--port / LPI_PORT"
            ) from None
        raise PreflightError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    except socket.gaierror as err:
        sock.close()
        raise PreflightError(f"--host {host}: {err.strerror or err}") from None
    return sock


def check_backbone(settings) -> dict:
    """The backbone's source (`wire.schema.BackboneSource` fields) once its files are found."""
    from lpi.checkpoint import CheckpointError, source_kind

    name = settings.backbone
    if name is None:
        return {"kind": "demo", "name": "demo bundle", "detail": str(settings.data_dir / "demo")}
    kind = source_kind(name)
    if kind == "preset":  # Settings refuses it without --random-weights
        return {"kind": "random", "name": name, "detail": "random weights (seed 0)"}
    if kind == "path":
        if not Path(name).exists():
            raise PreflightError(
                f"--backbone {name}: no such file or folder (nor a preset or a model name: "
                f"ViT-B-32:openai, hf-hub:ORG/NAME, ORG/NAME)"
            )
        return {"kind": "path", "name": name, "detail": str(Path(name).resolve())}
    from lpi import hub

    if settings.allow_download:
        log.info("resolving the backbone; this may download it", extra={"backbone": name})
    try:
        resolved = hub.resolve(name, allow_download=settings.allow_download)
    except CheckpointError as err:
        raise PreflightError(str(err)) from None
    return {"kind": "hub", "name": name, "detail": hub.describe(resolved)}


def describe_backbone(settings) -> dict:
    """The backbone's source without failing (an in-process app skips the preflight)."""
    from lpi.checkpoint import source_kind

    try:
        return check_backbone(settings)
    except PreflightError:
        kind = "hub" if source_kind(settings.backbone) == "hub" else "path"
        return {"kind": kind, "name": settings.backbone, "detail": ""}
