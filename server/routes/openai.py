"""OpenAI-compatible embeddings: `POST /v1/embeddings` and `GET /v1/models` over the service.

The same vectors as /embed (the model is the task), in OpenAI's shapes, and every refusal in
OpenAI's error body (`{"error": {"message", "type", "param", "code"}}`) with the status the
server's error table gives it, so OpenAI SDKs raise their usual exceptions.
"""

from __future__ import annotations

import base64
import contextlib

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from server.errors import field_of_error, refusal_of, retry_headers
from server.exceptions import RequestError
from server.inputs import decode_base64
from server.registry import TaskNotLoadedError
from server.routes.deps import KeyFirstRoute, require_api_key, service
from wire import openai, schema

STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
FIELDS = {"task": "model", "texts": "input", "body": None}


class ModelNotFoundError(RequestError):
    """`model` names neither a loaded task nor the bare backbone."""


class OpenAIRoute(KeyFirstRoute):
    """Every failure of these routes, the key check included, as OpenAI's error body."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def openai_errors(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as err:
                errors = err.errors() or [{"msg": "invalid request"}]
                message = "; ".join(_message(e) for e in errors[:5])
                return error(422, message, field_of_error(errors[0]), "invalid_request")
            except Exception as err:
                refusal = refusal_of(err)
                if isinstance(err, ModelNotFoundError):
                    return error(404, str(err), "model", "model_not_found")
                if refusal is None:
                    raise
                field = getattr(err, "field", None)
                headers = retry_headers(err, refusal)
                return error(refusal.status, str(err), field, refusal.code, headers)

        return openai_errors


router = APIRouter(
    prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)], route_class=OpenAIRoute
)
ERRORS = {code: {"model": openai.ErrorBody} for code in (401, 403, 404, 409, 413, 422, 503)}


@router.post("/embeddings", response_model=openai.EmbeddingsResponse, responses=ERRORS)
async def embeddings(body: openai.EmbeddingsRequest, request: Request) -> dict:
    """Embed texts (and, through the `images` extension, images) with a task's prompt."""
    svc = service(request)
    task = _task_of(svc, body.model)
    if body.dimensions is not None and body.dimensions != svc.engine.embed_dim:
        raise ModelDimensionsError(
            f"dimensions: {body.model!r} gives {svc.engine.embed_dim}-value embeddings; "
            f"dimensions must be {svc.engine.embed_dim} or absent (no truncation)",
            "dimensions",
        )
    images = [decode_base64(s, f"images[{i}]") for i, s in enumerate(body.images)]
    request.state.task = task
    with _renamed_fields():
        result = await svc.embed(task, body.texts, images)
    rows = (result["text_embeddings"] or []) + (result["image_embeddings"] or [])
    data = [
        {"index": i, "embedding": _encode(row, body.encoding_format)} for i, row in enumerate(rows)
    ]
    tokens = int(result.get("tokens", 0))
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": body.model, "usage": usage}


@router.get("/models", response_model=openai.ModelList, responses=ERRORS)
async def models(request: Request) -> dict:
    """The bare backbone and every loaded task, as OpenAI model cards."""
    app = request.app
    tasks = (await service(request).list_tasks())["tasks"]
    backbone = (app.state.backbone_source or {}).get("name") or "backbone"
    started = int(min((t["loaded_at"] for t in tasks), default=0))
    cards = [{"id": openai.BARE_MODEL, "created": started, "owned_by": backbone}]
    cards += [
        {"id": t["task"], "created": int(t["loaded_at"]), "owned_by": "lpi-serve"} for t in tasks
    ]
    return {"object": "list", "data": cards}


class ModelDimensionsError(RequestError):
    """`dimensions` other than the embedding size: vectors are never truncated."""


def _task_of(svc, model: str) -> str | None:
    if model == openai.BARE_MODEL:
        return None
    if model == schema.AUTO or (schema.is_task_name(model) and model in svc.registry):
        return model
    loaded = ", ".join(sorted(svc.registry.names())) or "none"
    raise ModelNotFoundError(
        f"model {model[:128]!r} is not loaded: use a task ({loaded}) or "
        f"{openai.BARE_MODEL!r} for the backbone without a prompt (GET /v1/models lists them)",
        "model",
    )


@contextlib.contextmanager
def _renamed_fields():
    """The service names /embed's fields (`texts[2]`, `task`); here they are `input[2]`, `model`."""
    try:
        yield
    except TaskNotLoadedError as err:  # unloaded since the check above
        raise ModelNotFoundError(str(err), "model") from None
    except Exception as err:
        field = getattr(err, "field", None)
        if isinstance(field, str):
            head, bracket, rest = field.partition("[")
            if head in FIELDS:
                err.field = (FIELDS[head] or "") + bracket + rest or None
        raise


def _encode(row: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return row
    return base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode("ascii")


def _message(err: dict) -> str:
    field = field_of_error(err)
    return f"{field}: {err.get('msg')}" if field != "body" else str(err.get("msg"))


def error(status: int, message: str, param: str | None, code: str, headers=None) -> JSONResponse:
    kind = STATUS_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)
