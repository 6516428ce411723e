"""POST /index and POST /search: a task's vectors in its Qdrant collection."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.routes.deps import KeyFirstRoute, require_api_key, service
from wire import schema

router = APIRouter(dependencies=[Depends(require_api_key)], route_class=KeyFirstRoute)
ERRORS = {code: {"model": schema.ErrorBody} for code in (404, 409, 413, 422, 503)}


@router.post("/index", response_model=schema.IndexResponse, responses=ERRORS)
async def index(body: schema.IndexRequest, request: Request) -> dict:
    """Embed items with the task's newest prompt version and upsert them; returns their ids."""
    request.state.task = body.task
    return await service(request).index(body)


@router.post("/search", response_model=schema.SearchResponse, responses=ERRORS)
async def search(body: schema.SearchRequest, request: Request) -> dict:
    """Nearest stored items of one prompt version to a text, image or vector query."""
    request.state.task = body.task
    return await service(request).search(body)
