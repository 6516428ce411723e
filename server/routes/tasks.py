"""Task prompts at runtime: list, inspect, load or replace, promote, unload.

A load reads an artifact from the configured artifact directory (a relative path, confined to
it) or from the request body (`application/octet-stream`, or a multipart `file`); the service
validates it completely and only then swaps it in, so a failed load leaves the old version
serving. This router does HTTP only (bodies, uploads, paths); the service does the rest.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam

from server.exceptions import InvalidPathError, InvalidRequestError, NoSuchArtifactError
from server.routes.deps import KeyFirstRoute, json_body, require_admin_key, require_api_key
from server.routes.deps import service as service_of
from wire import schema

router = APIRouter(prefix="/tasks", tags=["tasks"], route_class=KeyFirstRoute)
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


@router.get("", response_model=schema.TaskList, dependencies=[Depends(require_api_key)])
async def list_tasks(request: Request) -> dict:
    return await service_of(request).list_tasks()


@router.get(
    "/{task}",
    response_model=schema.TaskInfo,
    responses=ERRORS,
    dependencies=[Depends(require_api_key)],
)
async def get_task(request: Request, task: str = TaskPath) -> dict:
    request.state.task = task
    return await service_of(request).task_info(task)


@router.put(
    "/{task}",
    response_model=schema.LoadTaskResponse,
    responses=ERRORS,
    dependencies=[Depends(require_admin_key)],
    openapi_extra=UPLOAD_DOC,
)
async def load_task(
    request: Request,
    task: str = TaskPath,
    promote: bool = Query(False, description="Uploads: also make it the searched version."),
) -> dict:
    """Load or replace a task from an artifact (a path in the artifact directory, or bytes)."""
    request.state.task = task
    service, upload = service_of(request), None
    if request.headers.get("content-type", "").startswith("application/json"):
        body = await json_body(request, schema.LoadTaskRequest)
        source, shown = confined(request.app.state.settings.inbox, body.path), body.path
        promote = promote or body.promote
    else:
        source = upload = await _receive_upload(request, service.upload_dir)
        shown = "the uploaded artifact"
    try:
        return await service.load_task(task, source, promote=promote, shown=shown)
    finally:
        if upload is not None:
            upload.unlink(missing_ok=True)


@router.post(
    "/{task}/promote",
    response_model=schema.TaskInfo,
    responses=ERRORS,
    dependencies=[Depends(require_admin_key)],
)
async def promote_task(body: schema.PromoteRequest, request: Request, task: str = TaskPath) -> dict:
    """Make a loaded version the one /search uses (after re-indexing under it). A version
    with no vectors, while the serving one has some, is refused (409) unless `force`."""
    request.state.task = task
    return await service_of(request).promote_task(task, body.version, force=body.force)


@router.delete(
    "/{task}",
    response_model=schema.UnloadResponse,
    responses=ERRORS,
    dependencies=[Depends(require_admin_key)],
)
async def unload_task(
    request: Request,
    task: str = TaskPath,
    delete_vectors: bool = Query(False, description="Also delete the task's stored vectors."),
) -> dict:
    """Stop serving a task: new requests on it are refused at once, requests in flight finish
    with their version, then it (and, if asked, its vectors) leave."""
    request.state.task = task
    return await service_of(request).unload_task(task, delete_vectors=delete_vectors)


def confined(root: Path, relative: str) -> Path:
    """`relative` inside `root`, or a 422: no absolute paths, no '..', no escaping symlinks."""
    candidate = Path(relative)
    if not relative or candidate.is_absolute() or ".." in candidate.parts or "\x00" in relative:
        raise InvalidPathError(
            "path: give a path relative to the artifact directory, without '..'", "path"
        )
    base = root.resolve()
    try:  # a name too long, a symlink loop, no permission: the path's fault, named as such
        resolved = (base / candidate).resolve()
        inside = resolved.is_relative_to(base)
        found = inside and resolved.is_file()
        if found:
            with open(resolved, "rb"):  # readable now, not first found unreadable by the loader
                pass
    except (OSError, RuntimeError, ValueError) as err:  # Python < 3.13: a loop is RuntimeError
        loop = isinstance(err, RuntimeError)
        reason = getattr(err, "strerror", None) or ("symlink loop" if loop else "not a file name")
        raise InvalidPathError(f"path: cannot be resolved ({reason})", "path") from None
    if not inside:
        raise InvalidPathError("path: leaves the artifact directory", "path")
    if not found:
        raise NoSuchArtifactError(f"path: no file {relative!r} in the artifact directory", "path")
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
                        raise InvalidRequestError(
                            "file: send the artifact as a multipart file named 'file'", "file"
                        )
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
        raise InvalidRequestError("body: send the artifact file, or JSON with a path", "body")
    return Path(temp)
