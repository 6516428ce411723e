"""Shared by the server tests: artifacts from the tiny runs, apps in-process or on a socket."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image

import lpi
from export import read_artifact
from server.app import create_app
from server.settings import Settings


def export_artifacts(tiny_runs: Path, out: Path) -> dict[str, list[Path]]:
    """method -> the artifact files of its tasks (same task names for lpi and dense)."""
    from export.tasks import export_run

    backbone = lpi.load_backbone(tiny_runs / "backbone.safetensors")
    return {
        method: [a.path for a in export_run(tiny_runs / method, backbone, out / method)]
        for method in ("lpi", "dense")
    }


def settings(tiny_runs: Path, data_dir: Path, inbox: Path, **overrides) -> Settings:
    values = {
        "backbone": str(tiny_runs / "backbone.safetensors"),
        "data_dir": data_dir,
        "artifact_dir": inbox,
        "store": "memory",
        "max_wait_ms": 2.0,
    }
    return Settings(**(values | overrides))


@asynccontextmanager
async def running(app):
    """The app with its lifespan, and an httpx client on its ASGI transport."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client


def run(coroutine):
    return asyncio.run(coroutine)


@contextmanager
def serve_on_socket(app):
    """The app under uvicorn on a free loopback port, in a thread; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def png_bytes(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def reference_features(backbone, artifact_path: Path | None, texts=(), images=()):
    """What the model computes directly: the slow path the server must reproduce."""
    prefixes = (None, None)
    artifact = read_artifact(artifact_path) if artifact_path else None
    out = {}
    with torch.inference_mode():
        if texts:
            tokens = lpi.tokenize(list(texts))
            if artifact is not None:
                rows = torch.zeros(len(texts), dtype=torch.long)
                prefixes = lpi.batch_prefix([artifact.task_prefix()], rows)
            out["text"] = backbone.encode_text(tokens, prefixes[1])
        if images:
            pil = [Image.open(io.BytesIO(blob)) for blob in images]
            pixels = lpi.preprocess(pil, backbone.config.vision.image_size)
            if artifact is not None:
                rows = torch.zeros(len(images), dtype=torch.long)
                prefixes = lpi.batch_prefix([artifact.task_prefix()], rows)
            out["image"] = backbone.encode_image(pixels, prefixes[0])
    return out


def cosines(a, b) -> torch.Tensor:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


__all__ = ["create_app"]
