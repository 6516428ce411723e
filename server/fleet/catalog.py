"""The fleet's task catalog: per task, its loaded versions (artifact URIs), active and serving.

One source of truth for every replica. `CatalogBook` is the data and its rules (plain Python,
persisted in the artifact store as one small JSON file per task, `catalog/<task>.json`,
written atomically before a change is acknowledged, so a restarted holder loses nothing
acknowledged and a change costs the same with 10 or 10,000 tasks). `CatalogActor` holds one
book in a Ray actor: changes are serialised there, each bumps a generation, and replicas
long-poll `changes(since)` so a change reaches every replica in milliseconds (push), with a
full `snapshot()` now and then as the safety net (reconcile).

An entry is `{"active": v, "serving": v, "versions": {v: uri}, "info": {...}, "generation": g}`
(`info`: the active version's facts GET /tasks shows, absent in older entries); an unloaded
task leaves a tombstone `{"deleted": true, "generation": g}` so followers learn of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from pathlib import Path

from export.artifact import is_content_version
from lpi import atomic
from server.fleet.artifacts import ArtifactStore, ArtifactStoreError
from wire.schema import TASK_PATTERN

log = logging.getLogger("server.fleet.catalog")

CATALOG_DIR = "catalog"
CATALOG_FORMAT = 1
MAX_INFO_CHARS = 4096


class CatalogError(ArtifactStoreError):
    """An entry the catalog refuses (names no stored artifact, an unknown version...)."""


class CatalogBook:
    """The catalog's entries and generation, persisted in `store.root`/catalog/<task>.json."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self.folder = store.root / CATALOG_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.entries: dict[str, dict] = {}
        for path in sorted(self.folder.glob("*.json")):
            data = json.loads(path.read_text())
            if data.get("format") != CATALOG_FORMAT:
                raise CatalogError(
                    f"{CATALOG_DIR}/{path.name}: unknown format {data.get('format')!r}"
                )
            self.entries[path.stem] = data["entry"]
        self.generation = max((e["generation"] for e in self.entries.values()), default=0)

    def publish(
        self, task: str, active: str, serving: str | None, versions: dict, info: dict | None = None
    ) -> int:
        """Set a task's entry (checked first: nothing refused is written); the generation.

        `info`: what GET /tasks shows of the active version (layers, tokens, ...), so a replica
        that does not hold the task can list it without reading its artifact."""
        self._check(task, active, serving, versions)
        entry = {"active": active, "serving": serving, "versions": dict(versions)}
        if info is not None:
            if not isinstance(info, dict) or len(json.dumps(info, default=str)) > MAX_INFO_CHARS:
                raise CatalogError(f"task {task!r}: info must be a small object", "info")
            entry["info"] = info
        return self._set(task, entry)

    def remove(self, task: str) -> int:
        if task not in self.live():
            return self.generation
        return self._set(task, {"deleted": True})

    def live(self) -> dict[str, dict]:
        return {t: e for t, e in self.entries.items() if not e.get("deleted")}

    def changes(self, since: int) -> dict[str, dict]:
        """Entries (tombstones included) changed after generation `since`."""
        return {t: e for t, e in self.entries.items() if e["generation"] > since}

    def _set(self, task: str, entry: dict) -> int:
        entry["generation"] = self.generation + 1
        path = self.folder / f"{task}.json"  # task names are safe file names (TASK_PATTERN)
        atomic.write_json(path, {"format": CATALOG_FORMAT, "entry": entry})
        self.generation += 1  # only once it is on disk: acknowledged means persisted
        self.entries[task] = entry
        return self.generation

    def _check(self, task: str, active: str, serving: str | None, versions: dict) -> None:
        if not isinstance(task, str) or re.fullmatch(TASK_PATTERN, task) is None:
            raise CatalogError(f"task name {str(task)[:80]!r} is not valid", "task")
        if not isinstance(versions, dict) or not versions:
            raise CatalogError(f"task {task!r}: an entry needs at least one version", "versions")
        for version, uri in versions.items():
            if not is_content_version(version):
                raise CatalogError(f"task {task!r}: {version!r} is not a prompt version", "version")
            self.store.check_uri(uri)
        for name, version in (("active", active), ("serving", serving)):
            if version is not None and version not in versions:
                raise CatalogError(
                    f"task {task!r}: {name} version {version!r} has no artifact", name
                )


class CatalogActor:
    """One `CatalogBook` behind a Ray actor (async: changes run one at a time on its loop)."""

    def __init__(self, root: str) -> None:
        self.book = CatalogBook(ArtifactStore(Path(root)))
        self._changed = asyncio.Condition()
        log.info("catalog at generation %d, %d tasks", self.book.generation, len(self.book.live()))

    async def publish(self, task: str, active: str, serving: str | None, versions: dict, info=None):
        """The new generation, or ("error", field, message) for a refused entry."""
        try:
            generation = self.book.publish(task, active, serving, versions, info)
        except ArtifactStoreError as err:
            return ("error", err.field, str(err))
        await self._notify()
        return generation

    async def remove(self, task: str) -> int:
        generation = self.book.remove(task)
        await self._notify()
        return generation

    async def snapshot(self) -> tuple[int, dict[str, dict]]:
        return self.book.generation, self.book.live()

    async def changes(self, since: int, timeout_s: float) -> tuple[int, dict[str, dict]]:
        """Wait (at most `timeout_s`) for a generation after `since`; what changed after it.

        A follower from before a restart of the holder (`since` beyond the book) gets all."""
        if since > self.book.generation:
            return self.book.generation, self.book.live()
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.book.generation > since), timeout_s
                )
        return self.book.generation, self.book.changes(since)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
