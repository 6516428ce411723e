"""`create_app(settings)`: the FastAPI app, with every component built in its lifespan.

No module-level state: each app owns its backbone, engine, registry, batcher, store and
metrics, so tests can run several side by side. Start-up order: backbone (or the demo bundle),
engine, store, registry (restoring the tasks of the last run), batcher; then, for the demo,
its tasks and their test items. Shut-down drains the batcher, then closes the store.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI

import lpi
from server.batcher import Batcher
from server.engine import build_engine
from server.errors import install_error_handlers
from server.inputs import Limits
from server.metrics import Metrics
from server.middleware import BodyLimit, RequestMetrics
from server.registry import TaskRegistry
from server.routes import embed, health, tasks, vectors
from server.service import Service
from server.settings import Settings
from wire import schema

log = logging.getLogger("server.app")


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app.state
        components = await _start(settings, metrics)
        state.service, state.restore_failures, state.demo = components
        try:
            if state.demo is not None:
                await _serve_demo(state.service, state.demo)
            yield
        finally:
            state.service.batcher.close()
            state.service.registry.close()
            state.service.store.close()

    app = FastAPI(
        title="lpi-serve",
        version="0.1.0",
        summary="Continual vision-language retrieval with hot-swappable low-rank task prompts.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.restore_failures = []
    install_error_handlers(app)
    for router in (embed.router, vectors.router, tasks.router, health.router):
        app.include_router(router)
    app.add_middleware(RequestMetrics, metrics=metrics, is_loaded=_loaded_in(app))
    app.add_middleware(
        BodyLimit,
        default_limit=settings.max_body_bytes,
        upload_limit=settings.max_artifact_bytes,
    )
    return app


async def _start(settings: Settings, metrics: Metrics):
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(build_service, settings, metrics)


def build_service(settings: Settings, metrics: Metrics) -> tuple[Service, list[str], object]:
    """Every component, in start-up order; the demo bundle when no backbone is configured."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.inbox.mkdir(parents=True, exist_ok=True)
    demo = None
    backbone_source = settings.backbone
    if backbone_source is None:
        from server.demo import ensure_demo_bundle

        demo = ensure_demo_bundle(settings.data_dir / "demo", tasks=settings.demo_tasks)
        backbone_source = str(demo.backbone)
    backbone = lpi.load_backbone(backbone_source, device=settings.device)
    engine = build_engine(
        settings.engine, backbone, device=settings.device, slots=settings.pool_slots,
        max_rank=settings.pool_rank, onnx_dir=settings.onnx_dir, threads=settings.threads,
    )  # fmt: skip
    store = open_store(settings)
    registry = TaskRegistry(engine, store, settings.data_dir / "registry", backbone, metrics)
    failures = registry.restore()
    batcher = Batcher(
        engine.encode,
        max_batch=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000,
        max_queue_rows=settings.max_queue_rows,
        metrics=metrics,
    )
    batcher.start()
    limits = Limits(
        max_items=settings.max_items,
        max_image_pixels=settings.max_image_pixels,
        max_text_chars=settings.max_text_chars,
        image_size=engine.image_size,
        context_length=engine.context_length,
    )
    service = Service(engine, registry, batcher, store, limits, settings.request_timeout_s)
    log.info(
        "serving backbone %s on %s (%s), %d tasks restored, store %s",
        engine.backbone_id[:12], settings.device, engine.name, len(registry), settings.store,
    )  # fmt: skip
    return service, failures, demo


def open_store(settings: Settings):
    """The configured store: local mode or edge in data_dir, memory, or a server by URL.

    Each store's client is imported only when chosen: qdrant-edge-py is an optional extra.
    """
    layout = settings.layout
    if settings.store == "edge":
        from server.store.edge import EdgeStore

        return EdgeStore(settings.data_dir / "edge", layout=layout)
    from server.store.qdrant import QdrantStore

    if settings.store == "memory":
        return QdrantStore(location=":memory:", layout=layout)
    if settings.store == "local":
        return QdrantStore(settings.data_dir / "qdrant", layout=layout)
    key = settings.store_api_key.get_secret_value() if settings.store_api_key else None
    return QdrantStore(url=settings.store, api_key=key, layout=layout)


async def _serve_demo(service: Service, demo) -> None:
    """Load the demo's tasks (first run) and index their test items once per version."""
    registry = service.registry
    for task, artifact in demo.artifacts.items():
        if task not in registry:
            registry.load(task, Path(artifact))
        version = registry.serving_version(task)
        if service.store.count(task, version) > 0:
            continue
        items = demo.items.get(task, [])
        for start in range(0, len(items), service.limits.max_items):
            chunk = items[start : start + service.limits.max_items]
            request = schema.IndexRequest(task=task, items=[
                schema.IndexItem(id=item.id, image=_b64(item.image), payload=item.payload)
                for item in chunk
            ])  # fmt: skip
            await service.index(request)
        log.info("demo task %s: %d test images indexed", task, len(items))


def _b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def _loaded_in(app: FastAPI):
    """Whether a task is loaded, for metric labels (none before the service exists)."""

    def is_loaded(task: str) -> bool:
        service = getattr(app.state, "service", None)
        return service is not None and task in service.registry

    return is_loaded
