"""Resumable bulk indexing: `/index` with `skip_existing` writes only the ids a task's version
does not hold yet, so a bulk run killed halfway is simply run again."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from server.exceptions import InvalidRequestError
from server.store import ConflictError
from wire import schema


async def index_missing(service, request: schema.IndexRequest) -> dict:
    """The ids stored under the newest version are skipped (`skipped`); the rest are indexed
    by `service.index` under that same version (a version loaded meanwhile: 409, run again)."""
    if any(item.id is None for item in request.items):
        raise InvalidRequestError("skip_existing needs every item's id", "skip_existing")
    from server.service import request_fields

    with service.registry.pin(request.task) as (task, version):
        ids = [item.id for item in request.items]
        with request_fields():
            stored = await run_in_threadpool(service.store.existing_ids, task, version, ids)
        keep = [item for item in request.items if item.id not in stored]
        serving = service.registry.serving_version(task) == version
        answer = {"task": task, "prompt_version": version, "ids": [], "serving": serving}
        if keep:
            rest = request.model_copy(update={"items": keep, "skip_existing": False})
            answer = await service.index(rest)
    if answer["prompt_version"] != version:
        raise ConflictError(
            f"skip_existing: task {task!r} changed prompt version during the request (ids "
            "were checked against the old one): run it again",
            "skip_existing",
        )
    return answer | {"skipped": [id for id in ids if id in stored]}
