"""The task registry: loads, swaps, promotes and unloads task prompt versions live.

What is loaded and who holds it is `versions.VersionTable`; the folder on disk is
`state_dir.StateDir`; the start-up restore is `restore`. This module composes them with the
engine and the store, one admin change at a time.

Loading is all-or-nothing: the artifact is validated (format, checksum, shapes, finite values,
made for this backbone), checked against and added to the engine, copied into the state
directory and given room in the store before anything visible changes; `registry.json` is then
rewritten atomically. A promote refuses a version with no vectors while the serving one has
some (it would empty /search), unless forced. An unload refuses new requests on the task, waits
for those in flight (bounded), then removes it: a request never sees its task vanish under it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from export import ArtifactError, TaskArtifact, read_artifact
from export.artifact import is_content_version
from lpi.routing import TaskKeys, usable_centres
from server.engine import Engine, EngineError, Key
from server.metrics import Metrics
from server.origins import OriginWatch
from server.registry.errors import (
    InvalidArtifactError,
    RegistryError,
    TaskBusyError,
    TaskNotLoadedError,
    VersionNotIndexedError,
    VersionNotLoadedError,
    check_task_name,
)
from server.registry.restore import restore_tasks
from server.registry.state_dir import StateDir
from server.registry.versions import LoadedVersion, Purpose, VersionTable
from server.store import StoreError, UnknownTaskError, VectorStore

log = logging.getLogger("server.registry")

DRAIN_TIMEOUT_S = 30.0  # how long an unload waits for requests holding the task


class TaskRegistry:
    """Tasks by name -> loaded prompt versions in the engine; thread-safe."""

    def __init__(
        self,
        engine: Engine,
        store: VectorStore,
        state_dir: Path,
        backbone,
        metrics: Metrics | None = None,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
    ) -> None:
        self.engine = engine
        self.store = store
        self.backbone = backbone
        self.metrics = metrics
        self.origins = OriginWatch(engine, store, metrics)  # what made the stored vectors
        self.drain_timeout_s = drain_timeout_s
        self.state = StateDir(state_dir)
        self.versions = VersionTable(drop=engine.remove, changed=self._set_gauges)
        self._admin = threading.Lock()  # one load/promote/unload at a time
        self._keys: tuple[int, TaskKeys] | None = None  # (table generation, keys)
        self._unrestored: dict[str, dict] = {}  # registry.json entries that did not come back
        # Start-up failures (restore, the demo's loads) until the task is loaded or unloaded:
        # (task, version or None) -> why. GET /tasks and /readyz list them.
        self._failed: dict[tuple[str, str | None], str] = {}

    # -- queries ------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return self.versions.names()

    def __contains__(self, task: object) -> bool:
        with self.versions.lock:
            return task in self.versions.tasks

    def __len__(self) -> int:
        with self.versions.lock:
            return len(self.versions.tasks)

    def info(self, task: str) -> dict:
        """What `GET /tasks/{task}` shows (the fields of `schema.TaskInfo`)."""
        with self.versions.lock:
            state = self.versions.require(task)
            loaded = state.versions[state.active]
            versions = sorted(state.versions)
            serving = state.serving
        meta = loaded.artifact.meta
        return {
            "task": task,
            "prompt_version": loaded.version,
            "serving_version": serving,
            "loaded_versions": versions,
            "source_task": loaded.artifact.task_id,
            "method": meta.get("method"),
            "layers": int(meta["layers"]),
            "tokens": int(meta["tokens"]),
            "ranks": {t: int(getattr(loaded.artifact.folded, t).rank) for t in ("image", "text")},
            "has_keys": bool(loaded.artifact.keys),
            "loaded_at": loaded.loaded_at,
            "vectors": self._count(task, serving),
            "made_by": self._made_by(task, serving),
        }

    def infos(self) -> list[dict]:
        """Every loaded task's info (GET /tasks); one unloaded meanwhile is left out."""
        infos = []
        for task in self.names():
            with suppress(TaskNotLoadedError):
                infos.append(self.info(task))
        return infos

    def serving_version(self, task: str) -> str | None:
        return self.versions.require(task).serving

    def task_keys(self) -> TaskKeys:
        """Routing keys of every active version that has them (for task='auto'), tasks being
        unloaded left out; rebuilt only when an active version changes."""
        with self.versions.lock:
            generation = self.versions.generation
            if self._keys is None or self._keys[0] != generation:
                artifacts = {
                    n: s.versions[s.active].artifact
                    for n, s in sorted(self.versions.tasks.items())
                    if not s.closing
                }
                usable, skipped = usable_centres(
                    {n: a.keys for n, a in artifacts.items() if a.keys}, self.engine.embed_dim
                )
                for name, reason in skipped.items():
                    log.warning("task %s left out of task='auto' routing: %s", name, reason)
                self._keys = (generation, TaskKeys.from_centres(usable))
            return self._keys[1]

    # -- pins ---------------------------------------------------------------------------------

    @contextmanager
    def pin(self, task: str, purpose: Purpose = "active") -> Iterator[Key]:
        """Hold the version a request uses; yields the engine key (task, version)."""
        with self.versions.pin_many([task], purpose) as keys:
            yield keys[task]

    def pin_many(self, tasks: Sequence[str], purpose: Purpose = "active"):
        """Pin several tasks at once (rows routed to different tasks); task -> key."""
        return self.versions.pin_many(tasks, purpose)

    # -- admin --------------------------------------------------------------------------------

    def load(
        self, task: str, source: Path, *, promote: bool = False, shown: str | None = None
    ) -> tuple[str | None, bool]:
        """Load (or replace) `task` from an artifact file; returns (previous version, changed).

        `shown` is how errors name the file (a path relative to the artifact directory, or
        the upload's name), never the server's own absolute path. Any failure leaves the
        registry, the engine and the store as they were. The version is held (pinned) from the
        moment it is found or added until the switch, so no request ending meanwhile can drop
        it; store calls run outside the lock requests take.
        """
        check_task_name(task)
        with self._admin:
            started = time.perf_counter()
            artifact = self._read(source, shown)
            version, key = artifact.prompt_version, (task, artifact.prompt_version)
            with self.versions.lock:
                held = self.versions.hold(task, version)
                active = self.versions.tasks[task].active if held is not None else None
            fresh = held is None
            try:
                if held is not None and held.artifact.digest != artifact.digest:
                    raise InvalidArtifactError(
                        f"task {task!r}: prompt version {version} is loaded with other tensors "
                        "(a content-hash collision); refusing to swap them under one label",
                        field="artifact.prompt_version",
                    )
                if active == version and not promote:
                    return version, False
                had_copy = not fresh or self.state.artifact(task, version).exists()
                if fresh:
                    held = self._add_to_engine(task, artifact, source)
                try:
                    serving = self._ensure_stored(task, version, promote)
                except Exception:
                    if fresh:  # leave no trace: the engine's slot and a copy this load made
                        self.engine.remove(key)
                        if not had_copy:
                            self.state.drop_copy(task, version)
                    raise
                previous = self.versions.switch(task, held, serving)
            finally:
                self.versions.unpin(task, version)
            self._unrestored.pop(task, None)
            self._forget_failures(task)
            self._save_state()
            self._observe_swap(started, previous != version)
            log.info("task %s: version %s serves new requests (was %s)", task, version, previous)
            return previous, previous != version

    def promote(self, task: str, version: str, *, force: bool = False) -> None:
        """Make a loaded version the one /search uses (the store's serving version).

        Refused (VersionNotIndexedError) when the version holds no vectors while the serving
        one holds some, unless `force`: /search would answer nothing, without a word.
        """
        with self._admin:
            with self.versions.lock:
                state = self.versions.require(task)
                if version not in state.versions:
                    raise VersionNotLoadedError(
                        f"task {task!r} has no loaded prompt version {version!r} "
                        f"(loaded: {sorted(state.versions)})",
                        field="version",
                    )
                serving = state.serving
                self.versions.hold(task, version)
            try:
                if not force and serving not in (None, version):
                    self._check_indexed(task, version, serving)
                self.store.promote(task, version)
                self.versions.set_serving(task, version)
            finally:
                self.versions.unpin(task, version)
        self._save_state()
        log.info("task %s: version %s serves /search (was %s)", task, version, serving)

    def unload(self, task: str, *, delete_vectors: bool = False) -> list[str]:
        """Stop serving `task`; stored vectors are kept unless `delete_vectors`.

        New requests on the task are refused at once; those in flight finish with their
        version, and the task (and its vectors) leave only after them. If some still hold it
        after `drain_timeout_s`, nothing is unloaded (TaskBusyError) and the task serves on.
        """
        with self._admin:
            self.versions.close(task)
            left = self.versions.wait_unpinned(task, self.drain_timeout_s)
            if left:
                self.versions.reopen(task)
                raise TaskBusyError(
                    f"task {task!r}: {left} requests still hold it after "
                    f"{self.drain_timeout_s:g} s; nothing was unloaded, retry later",
                    field="task",
                )
            if delete_vectors:  # before the task leaves: a failure leaves it listed, retryable
                self._delete_vectors(task)
            versions = self.versions.remove(task)
            self.origins.forget(task)
            self._unrestored.pop(task, None)
            self._forget_failures(task)
            self._save_state()
            log.info("task %s unloaded (versions %s)", task, versions)
            return versions

    def _delete_vectors(self, task: str) -> None:
        """Drop the task's vectors for an unload; on failure the task serves on (reopened) and
        the error says so: running the unload again finishes the delete."""
        try:
            with suppress(UnknownTaskError):  # never indexed, or deleted by an earlier try
                self.store.delete_task(task)
        except Exception as err:
            self.versions.reopen(task)
            log.exception("task %s: deleting its vectors failed; nothing was unloaded", task)
            known = isinstance(err, StoreError)  # its message is the store's; others may hold paths
            why = str(err) if known else f"{type(err).__name__}, see the server log"
            raise (type(err) if known else StoreError)(
                f"task {task!r}: deleting its vectors failed ({why}); the task is still loaded, "
                "retry the unload",
                "task",
            ) from err

    def restore(self) -> list[str]:
        """Reload the tasks of `registry.json`; returns what failed (logged, not fatal)."""
        failures, self._unrestored = restore_tasks(
            self.state.read(), self._restore_noted, self._store_serving, self.__contains__
        )
        self.versions.settle_all()
        self._save_state()
        return failures

    def record_failure(self, task: str, version: str | None, error: object) -> None:
        """A task (version) that could not be brought up at start: listed, not fatal, until
        an admin loads or unloads the task."""
        with self.versions.lock:
            self._failed[task, version] = str(error)

    def failures(self) -> list[dict]:
        """Start-up failures not since fixed (the fields of `schema.TaskFailure`)."""
        with self.versions.lock:
            failed = sorted(self._failed.items(), key=lambda item: (item[0][0], item[0][1] or ""))
        return [{"task": t, "version": v, "status": "failed", "error": e} for (t, v), e in failed]

    def close(self) -> None:
        """Release the state directory's lock (the process's exit releases it too)."""
        self.state.close()

    # -- internals ----------------------------------------------------------------------------

    def _read(self, source: Path, shown: str | None = None) -> TaskArtifact:
        """Read and validate an artifact; errors name it as `shown`, not by its server path."""
        try:
            return read_artifact(source, self.backbone, self.engine.backbone_id)
        except ArtifactError as err:
            if shown is not None:
                err.args = tuple(str(a).replace(str(source), shown) for a in err.args)
            raise

    def _check_engine(self, artifact: TaskArtifact) -> None:
        try:
            self.engine.check(artifact)
        except EngineError as err:
            raise self._refusal(err) from err

    @staticmethod
    def _refusal(err: EngineError) -> RegistryError:
        """A full pool or a key taken is capacity (409); anything else is the artifact's."""
        refusal = RegistryError if err.field == "task" else InvalidArtifactError
        return refusal(str(err), field=err.field)

    def _add_to_engine(self, task: str, artifact: TaskArtifact, source: Path) -> LoadedVersion:
        """Check, add (the engine probes it) and keep a copy of a new version; it comes back
        pinned once. A refused version leaves no file behind."""
        self._check_engine(artifact)
        try:
            self.engine.add((task, artifact.prompt_version), artifact)
        except EngineError as err:
            raise self._refusal(err) from err
        try:
            file = self.state.keep_copy(task, artifact.prompt_version, source)
        except BaseException:
            self.engine.remove((task, artifact.prompt_version))
            raise
        return LoadedVersion(artifact.prompt_version, artifact, file, time.time(), pins=1)

    def _ensure_stored(self, task: str, version: str, promote: bool) -> str:
        """Room for the version's vectors; returns the serving version afterwards.

        A serving version that no loaded prompt can query (the task was unloaded, or its
        artifact is gone) would make /search fail until promoted, so the new one takes over.
        """
        self.store.ensure_task(task, self.engine.embed_dim, version)
        serving = self.store.serving_version(task)
        with self.versions.lock:
            state = self.versions.tasks.get(task)
            orphaned = serving != version and (state is None or serving not in state.versions)
        if promote or orphaned:
            if orphaned and not promote:
                log.warning(
                    "task %s: serving version %s is not loaded; %s takes over",
                    task,
                    serving,
                    version,
                )
            self.store.promote(task, version)
            serving = version
        return serving

    def _check_indexed(self, task: str, version: str, serving: str) -> None:
        serving_count = self._count(task, serving)
        if serving_count and not self._count(task, version):
            raise VersionNotIndexedError(
                f"task {task!r}: prompt version {version} holds no vectors while {serving} "
                f"holds {serving_count}; index under {version} first (POST /index), or promote "
                "with force=true to serve an empty index",
                field="version",
            )

    def _forget_failures(self, task: str) -> None:
        with self.versions.lock:
            for key in [key for key in self._failed if key[0] == task]:
                del self._failed[key]

    def _restore_noted(self, task: str, version: str, active: str) -> None:
        """`_restore_version`, remembering why it failed (restore_tasks logs and goes on)."""
        try:
            self._restore_version(task, version, active)
        except Exception as err:
            self.record_failure(task, version, err)
            raise

    def _restore_version(self, task: str, version: str, active: str) -> None:
        check_task_name(task)
        if not is_content_version(version):
            raise InvalidArtifactError(f"registry names version {version!r}: not a content hash")
        file = self.state.artifact(task, version)
        artifact = self._read(file, self.state.relative(file))
        if artifact.prompt_version != version:
            raise InvalidArtifactError(
                f"{self.state.relative(file)}: holds version {artifact.prompt_version}"
            )
        self._check_engine(artifact)
        self.engine.add((task, version), artifact)
        try:
            self.store.ensure_task(task, self.engine.embed_dim, version)
            serving = self.store.serving_version(task)
        except BaseException:
            self.engine.remove((task, version))
            raise
        loaded = LoadedVersion(version, artifact, file, time.time())
        self.versions.add_restored(task, loaded, active, serving)

    def _store_serving(self, task: str) -> str | None:
        try:
            return self.store.serving_version(task)
        except StoreError:
            return None

    def _count(self, task: str, version: str | None) -> int:
        if version is None:
            return 0
        try:
            return self.store.count(task, version)
        except StoreError:
            return 0

    def _made_by(self, task: str, version: str | None) -> list[str]:
        read = getattr(self.store, "origins", None)
        with suppress(StoreError):
            return read(task, version) if read is not None and version is not None else []
        return []

    def _save_state(self) -> None:
        with self.versions.lock:
            tasks = {
                name: {
                    "active": state.active,
                    "versions": {
                        v: self.state.relative(loaded.file)
                        for v, loaded in sorted(state.versions.items())
                    },
                }
                for name, state in sorted(self.versions.tasks.items())
            }
        self.state.save(self._unrestored | tasks)

    def _observe_swap(self, started: float, changed: bool) -> None:
        if self.metrics and changed:
            self.metrics.swaps.inc()
            self.metrics.swap_seconds.observe(time.perf_counter() - started)

    def _set_gauges(self) -> None:
        if self.metrics:
            self.metrics.tasks_loaded.set(len(self))
            self.metrics.versions_loaded.set(self.versions.loaded_count())
