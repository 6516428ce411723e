"""The task registry: which prompt versions serve which task, loaded, swapped and unloaded live.

Each task has an *active* version (the newest loaded: `/embed` and `/index` use it) and a
*serving* version (the store's: `/search` embeds its query with it, so a search only ever
compares vectors of one prompt version). After a replace the two differ until the caller
re-indexes and promotes; both stay loaded in the engine meanwhile.

A request *pins* the versions it uses for its whole life, so a swap never changes a request
mid-flight: a version that is neither active nor serving any more leaves the engine only when
its last pin is released.

Loading is all-or-nothing: the artifact is validated (format, checksum, shapes, finite values,
made for this backbone), checked against the engine, copied into the state directory and added
to the engine before anything visible changes; `registry.json` is then rewritten atomically, so
after a crash the registry comes back with the last versions that loaded successfully.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from export import ArtifactError, TaskArtifact, read_artifact
from lpi import atomic
from lpi.routing import TaskKeys
from server.engine import Engine, EngineError, Key
from server.metrics import Metrics
from server.store import StoreError, UnknownTaskError, VectorStore

log = logging.getLogger("server.registry")

STATE_FILE = "registry.json"
STATE_FORMAT = 1
Purpose = Literal["active", "serving"]


class RegistryError(Exception):
    """Base of the registry's refusals; `field` names the request field at fault."""

    status = 409
    kind = "conflict"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class TaskNotLoadedError(RegistryError):
    status = 404
    kind = "unknown_task"


class VersionNotLoadedError(RegistryError):
    status = 409
    kind = "version_not_loaded"


class InvalidArtifactError(RegistryError):
    status = 422
    kind = "invalid_artifact"


@dataclass
class LoadedVersion:
    version: str
    artifact: TaskArtifact
    file: Path  # our own copy, under the state directory
    loaded_at: float
    pins: int = 0


@dataclass
class TaskState:
    name: str
    active: str
    serving: str | None
    versions: dict[str, LoadedVersion] = field(default_factory=dict)

    def needed(self) -> set[str]:
        return {self.active} | ({self.serving} if self.serving else set())


class TaskRegistry:
    """Tasks by name -> loaded prompt versions in the engine; thread-safe."""

    def __init__(
        self,
        engine: Engine,
        store: VectorStore,
        state_dir: Path,
        backbone,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.state_dir = Path(state_dir)
        self.backbone = backbone
        self.metrics = metrics
        self._tasks: dict[str, TaskState] = {}
        self._lock = threading.RLock()  # guards _tasks and pins
        self._admin = threading.Lock()  # one load/promote/unload at a time
        self._keys_cache: TaskKeys | None = None
        self._orphans: dict[Key, LoadedVersion] = {}  # unloaded tasks' versions still pinned
        # registry.json entries that failed to come back: kept until an admin loads or unloads
        # the task, so one transient failure at start does not forget the task for good.
        self._unrestored: dict[str, dict] = {}
        (self.state_dir / "artifacts").mkdir(parents=True, exist_ok=True)
        self._lock_file = None
        self._take_state_dir()

    # -- queries ------------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._tasks)

    def __contains__(self, task: object) -> bool:
        with self._lock:
            return task in self._tasks

    def __len__(self) -> int:
        with self._lock:
            return len(self._tasks)

    def info(self, task: str) -> dict:
        """What `GET /tasks/{task}` shows (the fields of `schema.TaskInfo`)."""
        with self._lock:
            state = self._require(task)
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
        }

    def serving_version(self, task: str) -> str | None:
        with self._lock:
            return self._require(task).serving

    def task_keys(self) -> TaskKeys:
        """Routing keys of every active version that has them (for task='auto'); rebuilt
        only when an active version changes."""
        with self._lock:
            if self._keys_cache is None:
                artifacts = {
                    n: s.versions[s.active].artifact for n, s in sorted(self._tasks.items())
                }
                self._keys_cache = TaskKeys.from_centres(
                    {n: a.keys for n, a in artifacts.items() if {"image", "text"} <= set(a.keys)}
                )
            return self._keys_cache

    # -- pins ---------------------------------------------------------------------------------

    @contextmanager
    def pin(self, task: str, purpose: Purpose = "active") -> Iterator[Key]:
        """Hold the version a request uses; yields the engine key (task, version)."""
        with self.pin_many([task], purpose) as keys:
            yield keys[task]

    @contextmanager
    def pin_many(self, tasks: Sequence[str], purpose: Purpose = "active") -> Iterator[dict]:
        """Pin several tasks at once (rows routed to different tasks); task -> key."""
        pinned: list[tuple[str, str]] = []
        with self._lock:
            for task in dict.fromkeys(tasks):
                state = self._require(task)
                version = state.active if purpose == "active" else state.serving
                if version is None or version not in state.versions:
                    raise VersionNotLoadedError(
                        f"task {task!r}: the store serves prompt version {state.serving!r}, which "
                        "is not loaded; load it, promote the loaded version, or search with "
                        "accept_mismatch",
                        field="task",
                    )
                state.versions[version].pins += 1
                pinned.append((task, version))
        try:
            yield {task: (task, version) for task, version in pinned}
        finally:
            with self._lock:
                for task, version in pinned:
                    self._unpin(task, version)

    # -- admin --------------------------------------------------------------------------------

    def load(self, task: str, source: Path, *, promote: bool = False) -> tuple[str | None, bool]:
        """Load (or replace) `task` from an artifact file; returns (previous version, changed).

        Any failure leaves the registry, the engine and the store as they were. The version is
        held (pinned) from the moment it is found or added until the switch, so no request
        ending meanwhile can drop it; store calls run outside the lock requests take.
        """
        with self._admin:
            started = time.perf_counter()
            artifact = self._read(source)
            version, key = artifact.prompt_version, (task, artifact.prompt_version)
            with self._lock:
                held = self._hold(task, version)
                unchanged = held is not None and self._active(task) == version and not promote
            fresh = held is None
            try:
                if unchanged:
                    return version, False
                if fresh:
                    held = self._add_to_engine(task, artifact, source)
                try:
                    serving = self._ensure_stored(task, version, promote)
                except Exception:
                    if fresh:
                        self.engine.remove(key)
                    raise
                with self._lock:
                    previous = self._switch(task, held, serving)
            finally:
                with self._lock:
                    self._unpin(task, version)
            self._unrestored.pop(task, None)
            self._save_state()
            self._observe_swap(started, previous != version)
            log.info("task %s: version %s serves new requests (was %s)", task, version, previous)
            return previous, previous != version

    def promote(self, task: str, version: str) -> None:
        """Make a loaded version the one /search uses (the store's serving version)."""
        with self._admin:
            with self._lock:
                if version not in self._require(task).versions:
                    raise VersionNotLoadedError(
                        f"task {task!r} has no loaded prompt version {version!r} "
                        f"(loaded: {sorted(self._tasks[task].versions)})",
                        field="version",
                    )
                self._hold(task, version)
            try:
                self.store.promote(task, version)
                with self._lock:
                    if task in self._tasks:
                        self._tasks[task].serving = version
            finally:
                with self._lock:
                    self._unpin(task, version)
        self._save_state()

    def unload(self, task: str, *, delete_vectors: bool = False) -> list[str]:
        """Stop serving `task`; stored vectors are kept unless `delete_vectors`.

        Versions still pinned by requests in flight stay in the engine until those finish.
        """
        with self._admin:
            with self._lock:
                state = self._tasks.pop(self._require(task).name)
                versions = sorted(state.versions)
                self._keys_cache = None
                for version, loaded in state.versions.items():
                    if loaded.pins == 0:
                        self.engine.remove((task, version))
                    else:
                        self._orphans[(task, version)] = loaded
                self._set_gauges()
            self._unrestored.pop(task, None)
            self._save_state()
            if delete_vectors:
                with contextlib.suppress(UnknownTaskError):  # never indexed
                    self.store.delete_task(task)
            log.info("task %s unloaded (versions %s)", task, versions)
            return versions

    def restore(self) -> list[str]:
        """Reload the tasks of `registry.json`; returns what failed (logged, not fatal).

        A load killed between the store's promote and the registry write leaves the store
        serving a version the registry does not name; its artifact copy was written before
        the promote, so it is restored too (and validated like any other).
        """
        failures = []
        for task, entry in self._read_state().items():
            failed = []
            for version in entry["versions"]:
                failed += self._try_restore(task, version, entry["active"])
            serving = self._store_serving(task)
            if serving is not None and serving not in entry["versions"]:
                failed += self._try_restore(task, serving, entry["active"])
            if failed and task not in self._tasks:
                self._unrestored[task] = entry
            failures += failed
        with self._lock:
            for state in self._tasks.values():
                self._settle(state)
        self._save_state()
        return failures

    def close(self) -> None:
        """Release the state directory's lock (the process's exit releases it too)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # -- internals ----------------------------------------------------------------------------

    def _active(self, task: str) -> str | None:
        state = self._tasks.get(task)
        return state.active if state else None

    def _hold(self, task: str, version: str) -> LoadedVersion | None:
        """Pin a loaded version (also one an unload left to in-flight requests); under _lock."""
        state = self._tasks.get(task)
        held = state.versions.get(version) if state else None
        held = held or self._orphans.get((task, version))
        if held is not None:
            held.pins += 1
        return held

    def _add_to_engine(self, task: str, artifact: TaskArtifact, source: Path) -> LoadedVersion:
        """Check, keep a copy of, and add a new version; it comes back pinned once."""
        self._check_engine(artifact)
        file = self._keep_copy(task, artifact, source)
        try:
            self.engine.add((task, artifact.prompt_version), artifact)
        except EngineError as err:
            raise RegistryError(str(err), field=err.field) from err
        return LoadedVersion(artifact.prompt_version, artifact, file, time.time(), pins=1)

    def _ensure_stored(self, task: str, version: str, promote: bool) -> str:
        """Room for the version's vectors; returns the serving version afterwards.

        A serving version that no loaded prompt can query (the task was unloaded, or its
        artifact is gone) would make /search fail until promoted, so the new one takes over.
        """
        self.store.ensure_task(task, self.engine.embed_dim, version)
        serving = self.store.serving_version(task)
        with self._lock:
            state = self._tasks.get(task)
            orphaned = serving != version and (state is None or serving not in state.versions)
        if promote or orphaned:
            if orphaned and not promote:
                log.warning("task %s: serving version %s is not loaded; %s takes over",
                            task, serving, version)  # fmt: skip
            self.store.promote(task, version)
            serving = version
        return serving

    def _switch(self, task: str, held: LoadedVersion, serving: str) -> str | None:
        """Make `held` the task's active version (under _lock); returns the previous one."""
        self._orphans.pop((task, held.version), None)  # taken back from an unload
        state = self._tasks.get(task)
        previous = state.active if state else None
        if state is None:
            state = self._tasks[task] = TaskState(task, held.version, serving)
        state.versions[held.version] = held
        state.active, state.serving = held.version, serving
        self._keys_cache = None
        self._set_gauges()
        return previous

    def _try_restore(self, task: str, version: str, active: str) -> list[str]:
        try:
            self._restore_version(task, version, active)
        except (ArtifactError, EngineError, RegistryError, StoreError, OSError) as err:
            log.error("task %s version %s not restored: %s", task, version, err)
            return [f"{task}@{version}: {err}"]
        return []

    def _store_serving(self, task: str) -> str | None:
        try:
            return self.store.serving_version(task)
        except StoreError:
            return None

    def _take_state_dir(self) -> None:
        """Lock the state directory (one server per directory), then sweep what a killed
        process left: partial uploads and temp files of atomic writes."""
        self._lock_file = open(self.state_dir / ".lock", "a+")  # noqa: SIM115 - held for life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise RegistryError(
                f"{self.state_dir} is in use by another server process; give each its own data_dir"
            ) from None
        leftovers = [
            *(self.state_dir / "uploads").glob("upload-*"),
            *self.state_dir.glob(atomic.TEMP_GLOB),
            *(self.state_dir / "artifacts").glob(f"*/{atomic.TEMP_GLOB}"),
        ]
        for path in leftovers:
            path.unlink(missing_ok=True)
        if leftovers:
            log.info("removed %d files left by an interrupted write", len(leftovers))

    def _require(self, task: str) -> TaskState:
        state = self._tasks.get(task)
        if state is None:
            raise TaskNotLoadedError(
                f"task {task!r} is not loaded (loaded: {sorted(self._tasks) or 'none'})",
                field="task",
            )
        return state

    def _unpin(self, task: str, version: str) -> None:
        """Release one pin (under _lock); a version nothing needs any more leaves the engine."""
        orphan = self._orphans.get((task, version))
        if orphan is not None:
            orphan.pins -= 1
            if orphan.pins == 0:
                del self._orphans[(task, version)]
                self.engine.remove((task, version))
                self._set_gauges()
            return
        state = self._tasks.get(task)
        loaded = state.versions.get(version) if state else None
        if loaded is not None:
            loaded.pins -= 1
            self._settle(state)

    def _settle(self, state: TaskState) -> None:
        """Drop versions that are neither active nor serving and hold no pin."""
        for version in list(state.versions):
            if version not in state.needed() and state.versions[version].pins == 0:
                del state.versions[version]
                self.engine.remove((state.name, version))
                self._set_gauges()

    def _read(self, source: Path) -> TaskArtifact:
        try:
            return read_artifact(source, self.backbone, self.engine.backbone_id)
        except ArtifactError as err:
            raise InvalidArtifactError(str(err), field="artifact") from err

    def _check_engine(self, artifact: TaskArtifact) -> None:
        try:
            self.engine.check(artifact)
        except EngineError as err:
            if err.field == "task":  # a full pool or a key taken: capacity, not the artifact
                raise RegistryError(str(err), field="task") from err
            raise InvalidArtifactError(str(err), field=err.field) from err

    def _keep_copy(self, task: str, artifact: TaskArtifact, source: Path) -> Path:
        """Copy the artifact under the state directory (atomically), where restarts find it."""
        target = self.state_dir / "artifacts" / task / f"{artifact.prompt_version}.safetensors"
        if target.exists():  # the same prompt version, kept by an earlier load
            return target
        with atomic.atomic_path(target) as temp:
            shutil.copyfile(source, temp)
        return target

    def _count(self, task: str, version: str | None) -> int:
        if version is None:
            return 0
        try:
            return self.store.count(task, version)
        except StoreError:
            return 0

    def _observe_swap(self, started: float, changed: bool) -> None:
        if self.metrics and changed:
            self.metrics.swaps.inc()
            self.metrics.swap_seconds.observe(time.perf_counter() - started)

    def _set_gauges(self) -> None:
        if self.metrics:
            self.metrics.tasks_loaded.set(len(self._tasks))
            held = sum(len(s.versions) for s in self._tasks.values()) + len(self._orphans)
            self.metrics.versions_loaded.set(held)

    # -- the state file -----------------------------------------------------------------------

    def _state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    def _save_state(self) -> None:
        with self._lock:
            tasks = {
                name: {
                    "active": state.active,
                    "versions": {
                        v: str(loaded.file.relative_to(self.state_dir))
                        for v, loaded in sorted(state.versions.items())
                    },
                }
                for name, state in sorted(self._tasks.items())
            }
            tasks = self._unrestored | tasks
        atomic.write_json(self._state_path(), {"format": STATE_FORMAT, "tasks": tasks},
                          sort_keys=True)  # fmt: skip

    def _read_state(self) -> dict:
        path = self._state_path()
        if not path.exists():
            return {}
        data = json.loads(path.read_text())
        if data.get("format") != STATE_FORMAT:
            raise RegistryError(f"{path}: unknown registry format {data.get('format')!r}")
        return data["tasks"]

    def _restore_version(self, task: str, version: str, active: str) -> None:
        file = self.state_dir / "artifacts" / task / f"{version}.safetensors"
        artifact = self._read(file)
        if artifact.prompt_version != version:
            raise InvalidArtifactError(f"{file}: holds version {artifact.prompt_version}")
        self._check_engine(artifact)
        self.engine.add((task, version), artifact)
        try:
            self.store.ensure_task(task, self.engine.embed_dim, version)
            serving = self.store.serving_version(task)
        except BaseException:
            self.engine.remove((task, version))
            raise
        with self._lock:
            state = self._tasks.get(task)
            if state is None:
                state = self._tasks[task] = TaskState(task, version, serving)
            state.versions[version] = LoadedVersion(version, artifact, file, time.time())
            if version == active or state.active not in state.versions:
                state.active = version
            state.serving = serving
            self._keys_cache = None
            self._set_gauges()
