"""`create_app(settings)`: the FastAPI app, with every component built in its lifespan.

No module-level state: each app owns its backbone, engine, registry, batcher, store and
metrics, so tests can run several side by side. Start-up order: backbone (or the demo bundle),
engine, store, registry (restoring the tasks of the last run), batcher; then, for the demo,
its tasks and their test items. With a backbone given, the lifespan waits for all of it; the
demo bundle instead builds after the port opens (`server.startup`: /readyz says what builds,
other routes answer 503 until it is done, shutdown cancels it). Shut-down drains the batcher,
then closes the store.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

import lpi
from lpi.continual.control import NO_CONTROL, Cancelled, Control
from server.batcher import Batcher
from server.docs import install_docs
from server.engine import build_engine
from server.errors import install_error_handlers
from server.inputs import Limits
from server.metrics import Metrics
from server.middleware import BodyLimit, RequestMetrics
from server.preflight import describe_backbone
from server.registry import TaskRegistry
from server.registry.restore import RESTORE_FAILURES
from server.routes import embed, health, index, openai, points, tasks, ui, vectors
from server.service import Service
from server.settings import Settings
from server.startup import StartingGate, Startup
from wire import schema

log = logging.getLogger("server.app")


def create_app(
    settings: Settings, *, assembly: Assembly | None = None, backbone_source: dict | None = None
) -> FastAPI:
    """The app; `assembly` swaps how the store and the registry are built (the fleet's
    replicas share both), everything else is the same. `backbone_source` is the preflight's
    answer where one ran (`python -m server`), so the backbone is not resolved twice."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app.state
        bring_up = asyncio.create_task(_bring_up(state, settings, metrics, assembly))
        try:
            if settings.backbone is not None:
                await bring_up  # a given backbone is loaded before the port opens
            yield  # the demo bundle builds in the background: the port answers at once
        finally:
            await state.startup.stop(bring_up)
            if getattr(state, "service", None) is not None:
                state.service.batcher.close()
                state.service.registry.close()
                state.service.store.close()

    app = FastAPI(
        title="lpi-serve",
        version="0.1.0",
        summary="Continual vision-language retrieval with hot-swappable low-rank task prompts.",
        lifespan=lifespan,
        docs_url=None,  # server.docs serves them from package data: no CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.restore_failures = []
    app.state.backbone_source = backbone_source or describe_backbone(settings)
    app.state.startup = Startup()
    install_error_handlers(app)
    routers = (
        embed.router,
        vectors.router,
        points.router,
        openai.router,
        tasks.router,
        health.router,
        index.router,
        ui.router,
    )
    for router in routers:
        app.include_router(router)
    install_docs(app)
    app.add_middleware(StartingGate, startup=app.state.startup)
    app.add_middleware(RequestMetrics, metrics=metrics, is_loaded=_loaded_in(app))
    app.add_middleware(
        BodyLimit,
        default_limit=settings.max_body_bytes,
        upload_limit=settings.max_artifact_bytes,
    )
    if settings.cors_origins:  # outermost: a preflight is answered before any other check
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["Retry-After"],
            max_age=600,
        )
    return app


async def _bring_up(state, settings: Settings, metrics: Metrics, assembly=None) -> None:
    """Every component (in a daemon thread), then the demo's tasks; `state.startup` says how
    far it got. A failure with a given backbone is raised (uvicorn exits); a failed demo build
    is reported by /readyz and stops `python -m server`."""
    startup = state.startup
    try:
        components = await startup.run_in_thread(
            build_service, settings, metrics, startup.control, assembly
        )
        state.service, state.restore_failures, state.demo = components
        if state.demo is not None:
            startup.report("indexing the demo's test images", 0.98)
            await _serve_demo(state.service, state.demo)
    except (Cancelled, asyncio.CancelledError):
        raise
    except Exception as error:
        if settings.backbone is not None:
            raise
        startup.fail(error)
        return
    startup.finish()


class Assembly:
    """How `build_service` makes the store and the registry; subclassed by `server.fleet`."""

    def open_store(self, settings: Settings):
        return open_store(settings)

    def registry(self, settings: Settings, engine, store, backbone, metrics) -> TaskRegistry:
        # An unload waits for the requests holding its task: each waits on the model at most
        # request_timeout_s per encode, and the longest makes two (bare, then routed).
        return TaskRegistry(
            engine,
            store,
            settings.data_dir / "registry",
            backbone,
            metrics,
            drain_timeout_s=2 * settings.request_timeout_s,
        )


def build_service(
    settings: Settings,
    metrics: Metrics,
    control: Control = NO_CONTROL,
    assembly: Assembly | None = None,
) -> tuple[Service, list[str], object]:
    """Every component, in start-up order; the demo bundle when no backbone is configured.

    `control` cancels the demo build and hears its progress (the bundle is 95% of it)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.inbox.mkdir(parents=True, exist_ok=True)
    demo = None
    backbone_source = settings.backbone
    if backbone_source is None:
        from server.demo import SIZES, ensure_demo_bundle

        demo = ensure_demo_bundle(
            settings.data_dir / "demo",
            tasks=settings.demo_tasks,
            sizes=SIZES[settings.demo_size],
            control=control.part(0.0, 0.95),
        )
        backbone_source = str(demo.backbone)
    control.part(0.95, 0.98, "loading the backbone, engine and store").step(0, 1)
    backbone = lpi.load_backbone(
        backbone_source, device=settings.device, allow_download=settings.allow_download
    )
    engine = build_engine(
        settings.engine,
        backbone,
        device=settings.device,
        slots=settings.pool_slots,
        max_rank=settings.pool_rank,
        onnx_dir=settings.onnx_dir,
        threads=settings.threads,
        precision=settings.onnx_precision,
        dtype=settings.dtype,
        cuda_graphs=settings.max_batch_size if settings.cuda_graphs else 0,
    )
    metrics.engine_info(engine)
    assembly = assembly or Assembly()
    store = assembly.open_store(settings)
    metrics.watch_builds(store)
    registry = assembly.registry(settings, engine, store, backbone, metrics)
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
        thumbnail_max_side=settings.thumbnail_max_side,
        thumbnail_max_bytes=settings.thumbnail_max_bytes,
    )
    service = Service(engine, registry, batcher, store, limits, settings.request_timeout_s)
    log.info(
        "serving backbone %s on %s (%s), %d tasks restored, store %s",
        engine.backbone_id[:12],
        settings.device,
        engine.name,
        len(registry),
        settings.store,
    )
    return service, failures, demo


def open_store(settings: Settings):
    """The configured store: local mode or edge in data_dir, memory, or a server by URL.

    Each store's client is imported only when chosen: qdrant-edge-py is an optional extra.
    """
    from server.store.configure import open_store as open_configured

    return open_configured(settings)


async def _serve_demo(service: Service, demo) -> None:
    """Load the demo's tasks (first run) and index their test items once per version."""
    registry = service.registry
    for task, artifact in demo.artifacts.items():
        if task not in registry:
            try:
                registry.load(task, Path(artifact))
            except RESTORE_FAILURES as err:  # e.g. an ONNX export of another J or N
                log.error("demo task %s not loaded: %s", task, err)
                registry.record_failure(task, None, err)
                continue
        version = registry.serving_version(task)
        if service.store.count(task, version) > 0:
            continue
        items = demo.items.get(task, [])
        for start in range(0, len(items), service.limits.max_items):
            chunk = items[start : start + service.limits.max_items]
            request = schema.IndexRequest(
                task=task,
                items=[
                    schema.IndexItem(id=item.id, image=_b64(item.image), payload=item.payload)
                    for item in chunk
                ],
            )
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
