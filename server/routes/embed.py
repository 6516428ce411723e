"""POST /embed: texts and images -> unit vectors, with a task's prompt, routed, or bare."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.exceptions import EmptyBatchError, InvalidRequestError, TooManyItemsError
from server.inputs import decode_base64
from server.routes.deps import KeyFirstRoute, json_body, require_api_key, service
from wire import schema

router = APIRouter(dependencies=[Depends(require_api_key)], route_class=KeyFirstRoute)

MULTIPART_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/EmbedRequest"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "task": {"type": "string", "pattern": schema.TASK_PATTERN},
                        "texts": {"type": "array", "items": {"type": "string"}},
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                        },
                    },
                }
            },
        },
    }
}


@router.post(
    "/embed",
    response_model=schema.EmbedResponse,
    responses={422: {"model": schema.ErrorBody}, 404: {"model": schema.ErrorBody}},
    openapi_extra=MULTIPART_DOC,
)
async def embed(request: Request) -> dict:
    """Embed texts and images (JSON with base64 images, or a multipart form with files)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        task, texts, images = await _from_form(request)
    else:
        body = await json_body(request, schema.EmbedRequest)
        task, texts = body.task, body.texts
        images = [decode_base64(s, f"images[{i}]") for i, s in enumerate(body.images)]
    request.state.task = task
    return await service(request).embed(task, texts, images)


@asynccontextmanager
async def _form(request: Request, limit: int):
    """The multipart form; more parts than `limit` is 413 like any batch over the limit."""
    try:
        form = await request.form(max_files=limit, max_fields=limit + 1)
    except StarletteHTTPException as err:
        if "Too many" in str(err.detail):
            raise TooManyItemsError(
                f"more than {limit} items; this server takes at most {limit} per request", "images"
            ) from None
        raise InvalidRequestError(f"body: {err.detail}", "body") from None
    try:
        yield form
    finally:
        await form.close()


async def _from_form(request: Request) -> tuple[str | None, list[str], list[bytes]]:
    limit = request.app.state.settings.max_items
    async with _form(request, limit) as form:
        task = form.get("task")
        if task is not None and not schema.is_task_name(task):
            raise InvalidRequestError("task: not a task name", "task")
        texts, images = [], []
        for text in form.getlist("texts"):
            if not isinstance(text, str):
                raise InvalidRequestError("texts: give texts as fields", "texts")
            texts.append(text)
        for i, upload in enumerate(form.getlist("images")):
            if isinstance(upload, str):
                raise InvalidRequestError(f"images[{i}]: send a file", f"images[{i}]")
            images.append(await upload.read())
    if not texts and not images:
        raise EmptyBatchError("nothing to embed: give texts or images", "texts")
    return task or None, texts, images
