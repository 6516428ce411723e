"""Bringing the registry back at start: the versions `registry.json` names, plus the store's.

A load killed between the store's promote and the registry write leaves the store serving a
version `registry.json` does not name; its artifact copy was written before the promote, so it
is restored too (and validated like any other). A version that fails to come back is logged and
reported, not fatal; its task's entry is remembered until an admin loads or unloads the task,
so one transient failure at start does not forget the task for good.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from export import ArtifactError
from server.engine import EngineError
from server.registry.errors import RegistryError
from server.store import StoreError
from wire.schema import is_task_name

log = logging.getLogger("server.registry")

RestoreOne = Callable[[str, str, str], None]  # (task, version, active) -> loaded, or raises
RESTORE_FAILURES = (ArtifactError, EngineError, RegistryError, StoreError, OSError)


def restore_tasks(
    entries: dict[str, dict],
    restore_one: RestoreOne,
    store_serving: Callable[[str], str | None],
    is_loaded: Callable[[str], bool],
) -> tuple[list[str], dict[str, dict]]:
    """Restore every version of `entries` (registry.json's tasks) and each task's serving
    version; returns (failures as 'task@version: why', entries of tasks that did not come back).
    """
    failures: list[str] = []
    unrestored: dict[str, dict] = {}
    for task, entry in entries.items():
        if (why := _malformed(task, entry)) is not None:
            log.error("registry.json: task %r not restored: %s", task, why)
            failures.append(f"{task}: {why}")
            continue
        versions = list(entry["versions"])
        failed = [why for v in versions if (why := _attempt(restore_one, task, v, entry))]
        serving = store_serving(task)  # read after the versions: their ensure_task may set it
        if serving is not None and serving not in versions:
            failed += [why] if (why := _attempt(restore_one, task, serving, entry)) else []
        if failed and not is_loaded(task):
            unrestored[task] = entry
        failures += failed
    return failures, unrestored


def _malformed(task: object, entry: object) -> str | None:
    """Why a registry.json entry cannot be restored as written, or None. A hand-edited or
    damaged file must not crash the start (one task never stops the rest) nor let a name
    become a path outside the state folder."""
    if not is_task_name(task):
        return "not a task name"
    if not isinstance(entry, dict):
        return "entry is not an object"
    versions, active = entry.get("versions"), entry.get("active")
    if not isinstance(versions, dict | list) or not all(isinstance(v, str) for v in versions):
        return "'versions' does not name versions"
    if not isinstance(active, str):
        return "'active' is not a version string"
    return None


def _attempt(restore_one: RestoreOne, task: str, version: str, entry: dict) -> str | None:
    """Restore one version; None, or why it failed."""
    try:
        restore_one(task, version, entry["active"])
    except RESTORE_FAILURES as err:
        log.error("task %s version %s not restored: %s", task, version, err)
        return f"{task}@{version}: {err}"
    except Exception as err:  # a bug, not the artifact: one task still never stops the rest
        log.exception("task %s version %s not restored: unexpected %r", task, version, err)
        return f"{task}@{version}: {type(err).__name__}: {err}"
    return None
