"""GET /healthz (the process answers), /readyz (it can serve), /metrics (Prometheus).

While the server starts (the demo bundle builds in the background), /healthz already answers
200 and /readyz answers 503 with what is being built and the fraction done.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from wire import schema

router = APIRouter()


@router.get("/healthz", response_model=schema.Health)
async def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz", response_model=schema.Readiness, responses={503: {"model": schema.Readiness}}
)
async def readyz(request: Request):
    state = request.app.state
    if not state.startup.ready:
        return JSONResponse(_starting(state), status_code=503)
    service = state.service
    queued = service.batcher.queued_rows
    full = queued >= service.batcher.max_queue_rows
    # Tasks that failed at start are reported but do not stop the others from serving; an
    # admin's load of the task clears its entry.
    failed = service.registry.failures()
    reasons = ["the queue is full"] * full + [
        f"task {f['task']}{'@' + f['version'] if f['version'] else ''} failed: {f['error']}"
        for f in failed
    ]
    body = {
        "ready": not full,
        "backbone": service.engine.backbone_id,
        "engine": service.engine.name,
        "dtype": getattr(service.engine, "dtype", None),
        "dtype_reason": getattr(service.engine, "dtype_reason", None),
        "tasks": len(service.registry),
        "queue_rows": queued,
        "reasons": reasons,
        "backbone_source": state.backbone_source,
        "data_dir": str(state.settings.data_dir),
        "failed": failed,
    }
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


def _starting(state) -> dict:
    """Readiness before the service exists: no backbone or engine yet (empty strings)."""
    startup = state.startup
    return {
        "ready": False,
        "backbone": "",
        "engine": "",
        "tasks": 0,
        "queue_rows": 0,
        "reasons": [startup.describe()],
        "building": startup.building,
        "progress": startup.progress,
        "backbone_source": state.backbone_source,
        "data_dir": str(state.settings.data_dir),
    }


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
