"""GET /healthz (the process answers), /readyz (it can serve), /metrics (Prometheus)."""

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
    service = state.service
    queued = service.batcher.queued_rows
    full = queued >= service.batcher.max_queue_rows
    # Tasks that failed to come back are reported but do not stop the others from serving.
    reasons = ["the queue is full"] * full + [f"not restored: {f}" for f in state.restore_failures]
    body = {
        "ready": not full,
        "backbone": service.engine.backbone_id,
        "engine": service.engine.name,
        "tasks": len(service.registry),
        "queue_rows": queued,
        "reasons": reasons,
    }
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
