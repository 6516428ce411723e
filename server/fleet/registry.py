"""`FleetRegistry`: one replica's registry, kept equal to the fleet's catalog.

Admin changes made on this replica (load, promote, unload) happen locally first, exactly as in
one process (all validation, the engine's probe, the store), then the resulting entry is
published to the catalog, its artifacts copied into the shared artifact store; the HTTP answer
waits for the catalog, so an acknowledged change is one every replica will apply.

A follower thread long-polls the catalog and applies other replicas' changes: it first marks
every changed task *behind* (requests on it get 409 + Retry-After: a replica never answers
with a version the catalog has replaced), loads what it lacks from the artifact store, then
lets the task serve again. A full snapshot every `reconcile_s` retries what failed and catches
anything missed. A version that cannot be loaded here (missing, corrupt, another backbone, a
URI outside the store) keeps its task behind on this replica and is named on /readyz; the
other replicas are not affected. The follower never writes the store's serving version: only
the replica where a promote was asked does.

With a working set (`working_set`, tasks held at most), a replica holds only the tasks it was
asked for: a request on a catalog task it does not hold is answered 409 + Retry-After while a
worker thread loads the task (cold), first unloading here the least recently used tasks that
no request holds; catalog changes are applied only to the tasks held, the rest are known.
`hold` loads a task before a request routed here by Ray Serve's multiplexing reaches the app.
GET /tasks lists every catalog task: one not held here is described from its catalog entry
(the facts of its artifact are published with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from export import ArtifactError
from server.engine import EngineError
from server.fleet.artifacts import ArtifactStore
from server.registry import RegistryError, TaskNotLoadedError, TaskRegistry
from server.store import StoreError, UnknownTaskError

log = logging.getLogger("server.fleet.registry")

FOLLOW_POLL_S = 2.0  # one long-poll of the catalog at most (it answers at once on a change)
RECONCILE_S = 5.0  # a full snapshot at least this often
APPLY_FAILURES = (ArtifactError, EngineError, RegistryError, StoreError, OSError)


COUNTERS = 16  # store calls at once when GET /tasks counts vectors (the store actor's 16)
# What GET /tasks shows that is not read from the artifact (the rest is kept in the catalog).
LIVE_INFO = {"task", "prompt_version", "serving_version", "loaded_versions", "vectors", "made_by"}


class CatalogSyncError(RegistryError):
    """This replica is still loading the catalog's version of the task (or failed to)."""

    retry_after = 1.0


class FleetRegistry(TaskRegistry):
    def __init__(
        self,
        *args,
        link,
        artifacts: ArtifactStore,
        reconcile_s: float = RECONCILE_S,
        working_set: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.working_set = working_set  # None: hold every catalog task
        self._known: dict[str, dict] = {}  # the catalog's live entries
        self._used: OrderedDict[str, None] = OrderedDict()  # tasks held, least recent first
        self._cold = ThreadPoolExecutor(1, thread_name_prefix="cold-load")
        self._loading: dict[str, Future] = {}  # cold loads started, by task
        self._loading_lock = threading.Lock()
        self.link, self.artifacts, self.reconcile_s = link, artifacts, reconcile_s
        self.generation = 0  # the catalog generation this replica has applied
        self.restore_failures: list[str] = []  # restore()'s answer (updated in place)
        self._fleet = threading.RLock()  # one local change or catalog apply at a time
        self._following = False  # applying the catalog: never promote in the store
        self._target_serving: str | None = None  # the entry being applied's serving version
        self._behind: dict[str, str] = {}  # task -> why it may not serve here yet
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- admin changes made here, published ---------------------------------------------------

    def load(self, task, source, *, promote=False, shown=None):
        self._gate_cold(task)  # a replace starts from the catalog's versions, held here
        with self._fleet:
            self._make_room(task)
            result = super().load(task, source, promote=promote, shown=shown)
            self._publish(task)
            return result

    def promote(self, task, version, *, force=False):
        self._gate_cold(task)
        with self._fleet:
            super().promote(task, version, force=force)
            self._publish(task)

    def unload(self, task, *, delete_vectors=False):
        """Unload here and from the catalog; a catalog task this replica does not hold (cold,
        or failed to load) is removed from the catalog all the same, then its vectors deleted
        through the store when asked: removed first, so the replicas holding it stop taking
        its writes (a store outage: 503, and the entry is published again, still listed)."""
        with self._fleet:
            if task not in self and (task in self._behind or task in self._known):
                entry = dict(self._known.get(task, {}))
                versions = sorted(entry.get("versions", {}))
                self.link.remove(task)
                if delete_vectors:
                    try:
                        with contextlib.suppress(UnknownTaskError):  # never indexed
                            self.store.delete_task(task)
                    except Exception:
                        if "active" in entry:  # retryable: listed as before
                            self.link.publish(
                                task,
                                entry["active"],
                                entry["serving"],
                                entry["versions"],
                                entry.get("info"),
                            )
                        raise
                self._known.pop(task, None)
                self._clear(task)
                return versions
            versions = super().unload(task, delete_vectors=delete_vectors)
            self.link.remove(task)
            self._used.pop(task, None)
            return versions

    def _publish(self, task: str) -> None:
        with self.versions.lock:
            state = self.versions.tasks[task]
            files = {v: state.versions[v].file for v in state.needed() if v in state.versions}
            active, serving = state.active, state.serving
        uris = {version: self.artifacts.put(file) for version, file in files.items()}
        facts = {k: v for k, v in TaskRegistry.info(self, task).items() if k not in LIVE_INFO}
        self.link.publish(task, active, serving if serving in uris else None, uris, facts)
        self._clear(task)
        self._used[task] = None
        self._used.move_to_end(task)

    # -- requests: never on a version the catalog has replaced ---------------------------------

    def pin(self, task, purpose="active"):
        self._gate([task])
        return super().pin(task, purpose)

    def pin_many(self, tasks, purpose="active"):
        self._gate(tasks)
        return super().pin_many(tasks, purpose)

    def _gate(self, tasks) -> None:
        for task in tasks:
            self._gate_cold(task)
            why = self._behind.get(task)
            if why is not None:
                raise CatalogSyncError(f"task {task!r}: this replica {why}; retry", field="task")
            if self.working_set:
                with contextlib.suppress(KeyError):  # left the working set meanwhile
                    self._used.move_to_end(task)

    def _gate_cold(self, task: str) -> None:
        """A catalog task this replica does not hold: load it (in the background) and say so."""
        if not self.working_set or task in self or task not in self._known:
            return
        self._start_cold(task)
        raise CatalogSyncError(f"task {task!r}: this replica is loading it; retry", field="task")

    def _start_cold(self, task: str) -> Future | None:
        """The cold load of `task` under way, started now unless the task is behind already
        (a failed load is retried by the reconcile, not by every request)."""
        with self._loading_lock:
            if task not in self._behind:
                self._behind[task] = "is loading the task (cold)"
                self._loading[task] = self._cold.submit(self._load_cold, task)
            future = self._loading.get(task)
            return None if future is None or future.done() else future

    def _held_or_unknown(self, task: str) -> bool:
        """Nothing to wait for: no working set, held and finished loading (a cold load adds
        the task before it ends), or not a catalog task."""
        if not self.working_set or task not in self._known:
            return True
        return task in self and task not in self._behind

    def hold(self, task: str, timeout_s: float) -> bool:
        """Make sure this replica holds `task`, loading it now if it is a catalog task it does
        not hold (waiting at most `timeout_s`); whether it is held. Called before a request
        that names its task (Ray Serve's multiplexing: the proxy then routes the task's
        requests here), so a routed request finds its task warm instead of a 409."""
        if self._held_or_unknown(task):
            return task in self and task not in self._behind
        future = self._start_cold(task)
        if future is not None:
            with contextlib.suppress(FutureTimeout):
                future.result(timeout_s)
        return task in self and task not in self._behind

    async def hold_async(self, task: str, timeout_s: float) -> bool:
        """`hold` for the event loop: the wait holds no thread (cold loads run one at a time,
        so a burst of requests for cold tasks would pin a worker thread each for up to
        `timeout_s` and starve every other request of the pool)."""
        if self._held_or_unknown(task):
            return task in self and task not in self._behind
        future = self._start_cold(task)
        if future is not None:
            waited = asyncio.shield(asyncio.wrap_future(future))  # a timeout leaves it loading
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(waited, timeout_s)
        return task in self and task not in self._behind

    # -- what GET /tasks shows: every catalog task, held here or not -------------------------

    def names(self) -> list[str]:
        """The tasks held here and every task of the catalog this replica can describe."""
        listed = {t for t, e in dict(self._known).items() if "info" in e}
        return sorted(listed | set(TaskRegistry.names(self)))

    def infos(self) -> list[dict]:
        """GET /tasks: the tasks held here, then every other catalog task this replica can
        describe, their vectors counted in parallel (one store call each)."""
        described = {t: e for t, e in dict(self._known).items() if "info" in e}
        held = {}
        for task in TaskRegistry.names(self):  # not self.names(): those held here only
            with contextlib.suppress(TaskNotLoadedError):
                held[task] = TaskRegistry.info(self, task)
        cold = sorted(set(described) - set(held))
        stored_many = getattr(self.store, "stored_many", None)  # the store actor: one call
        if stored_many is not None:
            stored = stored_many([(t, described[t]["serving"]) for t in cold])
        else:
            with ThreadPoolExecutor(COUNTERS, thread_name_prefix="count") as pool:
                stored = list(pool.map(lambda t: self._stored(t, described[t]["serving"]), cold))
        for task, live in zip(cold, stored, strict=True):
            held[task] = self._described(task, described[task], live)
        return [held[task] for task in sorted(held)]

    def info(self, task: str) -> dict:
        """A held task's info; a catalog task not held here, from its catalog entry (vectors
        counted in the store); an older entry without its facts is loaded here first (409 +
        Retry-After meanwhile)."""
        if task in self:
            with contextlib.suppress(TaskNotLoadedError):  # unloaded meanwhile: the catalog
                return TaskRegistry.info(self, task)
        entry = self._known.get(task)
        if entry is None or "info" not in entry:
            if entry is not None:
                self._gate([task])  # cold or behind: 409 + Retry-After
            return TaskRegistry.info(self, task)  # TaskNotLoadedError, as in one process
        return self._described(task, entry, self._stored(task, entry["serving"]))

    def _stored(self, task: str, serving: str | None) -> dict:
        """What the store says of a task's serving version (as `TaskRegistry.info` reads it)."""
        return {"vectors": self._count(task, serving), "made_by": self._made_by(task, serving)}

    @staticmethod
    def _described(task: str, entry: dict, stored: dict) -> dict:
        return (
            entry["info"]
            | stored
            | {
                "task": task,
                "prompt_version": entry["active"],
                "serving_version": entry["serving"],
                "loaded_versions": sorted(entry["versions"]),
            }
        )

    def catalog(self) -> dict[str, dict]:
        """The fleet's tasks as the catalog has them (this replica's copy, at most
        `reconcile_s` old): task -> {active, serving, versions: {version: uri}}."""
        return {t: dict(e) for t, e in dict(self._known).items()}

    def _load_cold(self, task: str) -> None:
        with self._fleet, contextlib.ExitStack() as done:
            done.callback(lambda: self._loading.pop(task, None))
            entry = self._known.get(task)
            if entry is None or task in self:
                self._clear(task)
                return
            self._make_room(task)
            self._apply(task, entry)

    def _make_room(self, task: str) -> None:
        """Unload (here only) least recently used tasks no request holds, until `task` fits."""
        if not self.working_set or task in self:
            return
        for victim in list(self._used):
            if len(self) < self.working_set:
                return
            with self.versions.lock:
                state = self.versions.tasks.get(victim)
                busy = state is None or state.pins() > 0 or state.closing
            if not busy:
                TaskRegistry.unload(self, victim)
                self._used.pop(victim, None)
                log.info("task %s left this replica's working set for %s", victim, task)

    # -- following the catalog ----------------------------------------------------------------

    def restore(self) -> list[str]:
        """Every task of the catalog, before this replica reports ready; then follow it."""
        generation, entries = self.link.snapshot()
        self._catch_up(generation, entries, full=True)
        self._thread = threading.Thread(target=self._follow, name="catalog-follower", daemon=True)
        self._thread.start()
        return self.restore_failures

    def failures(self) -> list[dict]:
        """What /readyz names: the catalog versions this replica cannot load, and why."""
        behind = sorted(dict(self._behind).items())  # a copy: the follower may change it
        return super().failures() + [
            {"task": task, "version": None, "status": "failed", "error": why}
            for task, why in behind
            if why.startswith("cannot")
        ]

    def close(self) -> None:
        self._stop.set()
        self._cold.shutdown(wait=False, cancel_futures=True)
        super().close()

    def _follow(self) -> None:
        last_full = time.monotonic()
        while not self._stop.is_set():
            try:
                full = time.monotonic() - last_full >= self.reconcile_s
                if full:
                    generation, entries = self.link.snapshot()
                    last_full = time.monotonic()
                else:
                    generation, entries = self.link.changes(self.generation, FOLLOW_POLL_S)
                self._catch_up(generation, entries, full)
            except Exception:  # the catalog restarting, a store outage: try again shortly
                if self._stop.is_set():  # closing: the store may be closed under us
                    return
                log.exception("following the catalog failed; retrying")
                self._stop.wait(0.5)

    def _catch_up(self, generation: int, entries: dict[str, dict], full: bool) -> None:
        if full:  # tasks gone from the catalog while we did not listen
            gone = set(self._known) | set(TaskRegistry.names(self))
            entries = {**{t: {"deleted": True} for t in gone}, **entries}
        with self._fleet:
            for task, entry in entries.items():
                if entry.get("deleted"):
                    self._known.pop(task, None)
                else:
                    self._known[task] = entry
            held = entries
            if self.working_set:  # only the tasks held here follow the catalog
                held = {t: e for t, e in entries.items() if t in self or t in self._behind}
            changed = {t: e for t, e in held.items() if not self._matches(t, e)}
            for task in changed:
                self._behind.setdefault(task, "is loading the catalog's version")
            for task, entry in changed.items():
                self._apply(task, entry)
            self.generation = max(self.generation, generation)
            self._show_failures()

    def _matches(self, task: str, entry: dict) -> bool:
        with self.versions.lock:
            state = self.versions.tasks.get(task)
            if entry.get("deleted"):
                return state is None and task not in self._behind
            return (
                state is not None
                and task not in self._behind
                and state.active == entry["active"]
                and entry["serving"] in (None, state.serving)
            )

    def _apply(self, task: str, entry: dict) -> None:
        try:
            self._following = True
            if entry.get("deleted"):
                if task in self:
                    TaskRegistry.unload(self, task)
            else:
                self._apply_entry(task, entry)
        except APPLY_FAILURES as err:
            self._behind[task] = f"cannot load the catalog's version ({err})"
            log.error("task %s: catalog entry not applied: %s", task, err)
            return
        finally:
            self._following = False
        self._clear(task)
        if task in self:
            self._used[task] = None
            self._used.move_to_end(task)
        else:
            self._used.pop(task, None)

    def _apply_entry(self, task: str, entry: dict) -> None:
        active, serving, uris = entry["active"], entry["serving"], entry["versions"]
        self._target_serving = serving  # not the store's: it may already be a later one
        for version in dict.fromkeys([v for v in (serving, active) if v is not None]):
            with self.versions.lock:  # read again: the previous step may have changed it
                state = self.versions.tasks.get(task)
                loaded = state is not None and version in state.versions
                is_active = state is not None and state.active == version
            if not loaded or (version == active and not is_active):
                uri = uris[version]
                TaskRegistry.load(self, task, self.artifacts.path(uri), shown=uri)
        if serving is not None:
            with self.versions.lock:
                if serving not in self.versions.tasks[task].versions:
                    raise RegistryError(f"serving version {serving} did not load")
                self.versions.set_serving(task, serving)
        self._save_state()

    def _ensure_stored(self, task: str, version: str, promote: bool) -> str:
        if not self._following:
            return super()._ensure_stored(task, version, promote)
        self.store.ensure_task(task, self.engine.embed_dim, version)
        return self._target_serving or self.store.serving_version(task)

    def _clear(self, task: str) -> None:
        self._behind.pop(task, None)
        self._show_failures()

    def _show_failures(self) -> None:
        behind = sorted(dict(self._behind).items())
        self.restore_failures[:] = [f"{t}: {why}" for t, why in behind if why.startswith("cannot")]
