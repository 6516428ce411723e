"""Task prompts at runtime: list, inspect, load or replace, promote, unload.

A load reads an artifact from the configured artifact directory (a relative path, confined to
it) or from the request body (`application/octet-stream`, or a multipart `file`), validates it
completely and only then swaps it in; a failed load leaves the old version serving.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from server.errors import ApiError
from server.routes.deps import json_body, require_admin_key, require_api_key
from wire import schema

router = APIRouter(prefix="/tasks", tags=["tasks"])
TaskPath = PathParam(pattern=schema.TASK_PATTERN)
ERRORS = {code: {"model": schema.ErrorBody} for code in (401, 403, 404, 409, 413, 422)}

UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/LoadTaskRequest"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _registry(request: Request):
    return request.app.state.service.registry


@router.get("", response_model=schema.TaskList, dependencies=[Depends(require_api_key)])
async def list_tasks(request: Request) -> dict:
    registry = _registry(request)
    infos = await run_in_threadpool(lambda: [registry.info(t) for t in registry.names()])
    return {"tasks": infos}


@router.get(
    "/{task}", response_model=schema.TaskInfo, responses=ERRORS,
    dependencies=[Depends(require_api_key)],
)  # fmt: skip
async def get_task(request: Request, task: str = TaskPath) -> dict:
    request.state.task = task
    return await run_in_threadpool(_registry(request).info, task)


@router.put(
    "/{task}", response_model=schema.LoadTaskResponse, responses=ERRORS,
    dependencies=[Depends(require_admin_key)], openapi_extra=UPLOAD_DOC,
)  # fmt: skip
async def load_task(
    request: Request,
    task: str = TaskPath,
    promote: bool = Query(False, description="Uploads: also make it the searched version."),
) -> dict:
    """Load or replace a task from an artifact (a path in the artifact directory, or bytes)."""
    request.state.task = task
    if task == schema.AUTO:
        raise ApiError(422, "reserved_name", "task: 'auto' routes by task keys; pick another "
                       "name", "task")  # fmt: skip
    registry, upload = _registry(request), None
    if request.headers.get("content-type", "").startswith("application/json"):
        body = await json_body(request, schema.LoadTaskRequest)
        source = confined(request.app.state.settings.inbox, body.path)
        promote = promote or body.promote
    else:
        source = upload = await _receive_upload(request, registry.state_dir / "uploads")
    try:
        previous, changed = await run_in_threadpool(registry.load, task, source, promote=promote)
    finally:
        if upload is not None:
            upload.unlink(missing_ok=True)
    info = await run_in_threadpool(registry.info, task)  # counts vectors: outside the load
    return {"task": info, "previous_version": previous, "changed": changed}


@router.post(
    "/{task}/promote", response_model=schema.TaskInfo, responses=ERRORS,
    dependencies=[Depends(require_admin_key)],
)  # fmt: skip
async def promote_task(body: schema.PromoteRequest, request: Request, task: str = TaskPath) -> dict:
    """Make a loaded version the one /search uses (after re-indexing under it)."""
    request.state.task = task
    registry = _registry(request)
    await run_in_threadpool(registry.promote, task, body.version)
    return await run_in_threadpool(registry.info, task)


@router.delete(
    "/{task}", response_model=schema.UnloadResponse, responses=ERRORS,
    dependencies=[Depends(require_admin_key)],
)  # fmt: skip
async def unload_task(
    request: Request,
    task: str = TaskPath,
    delete_vectors: bool = Query(False, description="Also delete the task's stored vectors."),
) -> dict:
    """Stop serving a task; requests already running finish with their version."""
    request.state.task = task
    versions = await run_in_threadpool(
        lambda: _registry(request).unload(task, delete_vectors=delete_vectors)
    )
    return {"task": task, "unloaded_versions": versions, "vectors_deleted": delete_vectors}


def confined(root: Path, relative: str) -> Path:
    """`relative` inside `root`, or a 422: no absolute paths, no '..', no escaping symlinks."""
    candidate = Path(relative)
    if not relative or candidate.is_absolute() or ".." in candidate.parts or "\x00" in relative:
        raise ApiError(422, "invalid_path", "path: give a path relative to the artifact "
                       "directory, without '..'", "path")  # fmt: skip
    base = root.resolve()
    resolved = (base / candidate).resolve()
    if not resolved.is_relative_to(base):
        raise ApiError(422, "invalid_path", "path: leaves the artifact directory", "path")
    if not resolved.is_file():
        raise ApiError(404, "no_such_artifact", f"path: no file {relative!r} in the artifact "
                       "directory", "path")  # fmt: skip
    return resolved


async def _receive_upload(request: Request, folder: Path) -> Path:
    """Stream the body into a private temp file (the size limit is the middleware's)."""
    folder.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=folder, prefix="upload-", suffix=".safetensors")
    size = 0
    try:
        with os.fdopen(handle, "wb") as out:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                async with request.form(max_files=1, max_fields=1) as form:
                    upload = form.get("file")
                    if upload is None or isinstance(upload, str):
                        raise ApiError(422, "invalid_request", "file: send the artifact as a "
                                       "multipart file named 'file'", "file")  # fmt: skip
                    while chunk := await upload.read(1 << 20):
                        size += len(chunk)
                        out.write(chunk)
            else:
                async for chunk in request.stream():
                    size += len(chunk)
                    out.write(chunk)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    if size == 0:
        Path(temp).unlink(missing_ok=True)
        raise ApiError(422, "invalid_request", "body: send the artifact file, or JSON with "
                       "a path", "body")  # fmt: skip
    return Path(temp)
