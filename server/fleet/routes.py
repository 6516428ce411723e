"""The fleet's own routes: every task of the catalog, not only the answering replica's.

`GET /tasks` stays what one replica holds (full `TaskInfo`, read from the loaded artifact);
with a working set a replica holds a few tasks of many, so `GET /fleet/tasks` and
`GET /fleet/tasks/{task}` answer from the catalog: every task, its versions (artifact URIs),
its active and serving versions, and whether the answering replica holds it now.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam

from server.registry import TaskNotLoadedError
from server.routes.deps import require_api_key
from server.routes.deps import service as service_of
from wire import schema

router = APIRouter(prefix="/fleet", tags=["fleet"])
TaskPath = PathParam(pattern=schema.TASK_PATTERN)


def describe(task: str, entry: dict, held: bool) -> dict:
    return {
        "task": task,
        "active_version": entry["active"],
        "serving_version": entry["serving"],
        "versions": dict(entry["versions"]),
        "held_here": held,
    }


@router.get("/tasks", dependencies=[Depends(require_api_key)])
async def fleet_tasks(request: Request) -> dict:
    registry = service_of(request).registry
    catalog = registry.catalog()
    return {
        "tasks": [describe(t, catalog[t], t in registry) for t in sorted(catalog)],
        "generation": registry.generation,
    }


@router.get("/tasks/{task}", dependencies=[Depends(require_api_key)])
async def fleet_task(request: Request, task: str = TaskPath) -> dict:
    registry = service_of(request).registry
    entry = registry.catalog().get(task)
    if entry is None:
        raise TaskNotLoadedError(f"task {task!r} is not in the fleet's catalog", field="task")
    return describe(task, entry, task in registry)
