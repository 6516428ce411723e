"""Resumable bulk indexing: `/index` with `skip_existing` writes only the ids a task's version
does not hold yet, so a bulk run killed halfway is simply run again."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from starlette.concurrency import run_in_threadpool

from server.exceptions import InvalidRequestError, RequestError
from server.store import ConflictError, StoreError
from wire import schema

# An item's position as errors write it: `items[3].text`, or the store's `ids[3]`, `payloads[3]`.
POSITION = re.compile(r"\b(items|ids|payloads)\[(\d+)\]")


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
        at = [i for i, item in enumerate(request.items) if item.id not in stored]
        serving = service.registry.serving_version(task) == version
        answer = {"task": task, "prompt_version": version, "ids": [], "serving": serving}
        if at:
            keep = [request.items[i] for i in at]
            rest = request.model_copy(update={"items": keep, "skip_existing": False})
            with request_positions(at):
                answer = await service.index(rest)
    if answer["prompt_version"] != version:
        raise ConflictError(
            f"skip_existing: task {task!r} changed prompt version during the request (ids "
            "were checked against the old one): run it again",
            "skip_existing",
        )
    return answer | {"skipped": [id for id in ids if id in stored]}


@contextmanager
def request_positions(at: list[int]) -> Iterator[None]:
    """Errors about the j-th item indexed name it by its place in the request, `items[at[j]]`:
    the caller sent all the items, not the ones left after skipping."""
    try:
        yield
    except (RequestError, StoreError) as err:

        def position(match: re.Match) -> str:
            j = int(match.group(2))
            return f"{match.group(1)}[{at[j] if j < len(at) else j}]"

        if err.field:
            err.field = POSITION.sub(position, err.field)
        err.args = tuple(POSITION.sub(position, a) if isinstance(a, str) else a for a in err.args)
        raise
