"""POST /points/count, /points/list and /points/delete: a task's stored points, by id or
payload filter, so re-indexing and clean-up need no list kept by the caller.

All three act on the task's serving version (the vectors /search compares against).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.routes.deps import KeyFirstRoute, require_api_key, service
from wire import schema

router = APIRouter(
    prefix="/points",
    tags=["points"],
    dependencies=[Depends(require_api_key)],
    route_class=KeyFirstRoute,
)
ERRORS = {code: {"model": schema.ErrorBody} for code in (401, 403, 404, 409, 422, 503)}


@router.post("/count", response_model=schema.PointsResponse, responses=ERRORS)
async def count(body: schema.PointsRequest, request: Request) -> dict:
    """How many points the serving version holds (matching `filter`, if given)."""
    request.state.task = body.task
    return await service(request).points("count", body)


@router.post(
    "/list",
    response_model=schema.PointsResponse,
    responses=ERRORS,
    response_model_exclude_none=False,
)
async def list_points(body: schema.PointsRequest, request: Request) -> dict:
    """One page of ids and payloads; pass `next_offset` back as `offset` for the next page."""
    request.state.task = body.task
    return await service(request).points("list", body)


@router.post("/delete", response_model=schema.PointsResponse, responses=ERRORS)
async def delete(body: schema.DeletePointsRequest, request: Request) -> dict:
    """Delete points by id or by payload filter; `count` says how many existed."""
    request.state.task = body.task
    return await service(request).points("delete", body)
