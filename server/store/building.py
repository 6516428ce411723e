"""Index builds for Qdrant Edge shards that never stall the serving process.

qdrant-edge-py holds the GIL throughout `optimize()`, so a build runs in a child process
(`server.store.build_worker`) on a copy of the shard, in four phases:

1. copying: writes to the collection pause (searches do not) while the shard is flushed and
   copied to `{name}.building`; from then on every write is also journalled (ids only);
2. indexing: the child builds payload indexes and HNSW graphs on the copy; the serving shard
   keeps answering, exactly where it has no graph yet;
3. catching up: writes pause again; the journalled ids are copied from the serving shard to
   the built one (their latest state) and journalled deletes replayed;
4. swapping: the directories trade places (`{name}` -> `{name}.old`, the copy -> `{name}`) and
   the built shard opens; the old one closes once searches that began on it are done.

A SIGKILL at any point loses nothing acknowledged: until the swap the serving shard (and its
WAL) is untouched, and `EdgeBackend` repairs a half-done swap when it opens; an interrupted
build is started again. A failed build leaves the old shard serving and says why.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import qdrant_edge as qe

log = logging.getLogger("lpi.store")

BUILDING, OLD = ".building", ".old"
PHASES = ("queued", "copying", "indexing", "catching-up", "swapping", "done", "failed")
_REPLAY_PAGE = 256


class BuildError(RuntimeError):
    """A build failed; the serving shard is unchanged."""


@dataclass
class BuildStatus:
    collection: str
    phase: str = "queued"
    points: int = 0
    started: float = field(default_factory=time.time)
    seconds: float = 0.0
    error: str | None = None
    fields: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


class EdgeBuilder:
    """One worker thread running queued builds one at a time; `auto` also queues a build of
    any collection whose points outside an HNSW graph grew by `threshold(points)` since its
    last build (segments too small for a graph stay outside it: no build loop)."""

    def __init__(
        self,
        backend,
        threshold: Callable[[int], int],
        auto: bool = True,
        poll_s: float = 2.0,
        on_change: Callable[[BuildStatus], None] | None = None,
    ) -> None:
        self.backend = backend
        self.threshold = threshold
        self.auto = auto
        self.poll_s = poll_s
        self.on_change = on_change or (lambda status: None)
        self._queue: dict[str, list[tuple[str, str]]] = {}
        self._status: dict[str, BuildStatus] = {}
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._child: subprocess.Popen | None = None
        self._left: dict[str, int] = {}  # collection -> points outside a graph after its build
        for name in backend.interrupted_builds:
            log.warning("restarting an interrupted index build", extra={"collection": name})
            self._queue[name] = []
        self._thread = threading.Thread(target=self._loop, name="lpi-index-build", daemon=True)
        self._thread.start()

    # -- what callers use ------------------------------------------------------------------------

    def request(self, name: str, fields: Sequence[tuple[str, str]] = ()) -> None:
        """Queue a build of collection `name` (payload indexes `fields` first); idempotent."""
        with self._wake:
            queued = self._queue.setdefault(name, [])
            queued += [f for f in fields if f not in queued]
            self._status[name] = BuildStatus(name, fields=list(queued))
            self._wake.notify()
        self.on_change(self._status[name])

    def status(self) -> list[dict]:
        return [status.as_dict() for status in self.status_objects()]

    def status_objects(self) -> list[BuildStatus]:
        with self._wake:
            return list(self._status.values())

    def wait(self, name: str, timeout: float) -> BuildStatus:
        """Block until `name`'s latest build is done or failed (tests, the CLI)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._wake:
                status = self._status.get(name)
                if status and status.phase in ("done", "failed") and name not in self._queue:
                    return status
            time.sleep(0.05)
        raise TimeoutError(f"the index build of {name!r} did not finish in {timeout} s")

    def close(self) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify()
        child = self._child
        if child is not None and child.poll() is None:
            child.kill()  # the copy is discarded; the next open starts the build again
        self._thread.join(timeout=30)

    # -- the worker ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                if not self._queue:
                    self._wake.wait(self.poll_s)
                job = next(iter(self._queue.items()), None)
                if job is not None:
                    del self._queue[job[0]]
            if self._stop.is_set():
                return
            if job is not None:
                self._run(*job)
            elif self.auto:
                self._queue_grown()

    def _queue_grown(self) -> None:
        try:
            for name, points, unindexed in self.backend.index_gaps():
                grown = unindexed - self._left.get(name, 0)
                if grown > self.threshold(points) and name not in self._status_running():
                    log.info(
                        "queueing an index build",
                        extra={"collection": name, "points": points, "unindexed": unindexed},
                    )
                    self.request(name)
        except Exception:  # a store closing under the poll: the next poll retries
            log.debug("index gap poll failed", exc_info=True)

    def _status_running(self) -> set[str]:
        with self._wake:
            return {n for n, s in self._status.items() if s.phase not in ("done", "failed")}

    def _set(self, status: BuildStatus, phase: str, **changes) -> None:
        with self._wake:
            status.phase = phase
            status.seconds = time.time() - status.started
            for key, value in changes.items():
                setattr(status, key, value)
        self.on_change(status)

    def _run(self, name: str, fields: list[tuple[str, str]]) -> None:
        with self._wake:
            status = self._status[name] = BuildStatus(name, fields=fields)
        try:
            self._build(status, name, fields)
        except Exception as error:  # any failure leaves the old shard serving
            self.backend.end_build(name)
            shutil.rmtree(self.backend.build_dir(name), ignore_errors=True)
            log.error(
                "index build failed; the previous index keeps serving",
                extra={"collection": name, "error": str(error)},
            )
            self._set(status, "failed", error=str(error))
            self._left[name] = status.points  # retried on request, or once it grows again

    def _build(self, status: BuildStatus, name: str, fields: list[tuple[str, str]]) -> None:
        self._set(status, "copying")
        points = self.backend.begin_build(name)
        self._set(status, "indexing", points=points)
        result = self._index(status, self.backend.build_dir(name), fields)
        self._set(status, "catching-up")
        self.backend.finish_build(name, lambda: self._set(status, "swapping"))
        self._set(status, "done", points=result.get("points", points))
        self._left[name] = result.get("points", 0) - result.get("indexed", 0)
        log.info("index build done", extra={"collection": name, **result})

    def _index(self, status: BuildStatus, path, fields: list[tuple[str, str]]) -> dict:
        command = [sys.executable, "-m", "server.store.build_worker", str(path)]
        command += [f"--parent={os.getpid()}"]
        command += [f"--field={f}:{kind}" for f, kind in fields]
        # Output goes to files, not pipes: a child that writes more than a pipe holds while
        # nobody reads it (the loop below only polls) would block, and the build with it.
        with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
            self._child = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
            try:
                while self._child.poll() is None:
                    if self._stop.wait(1.0):
                        raise BuildError("the server is closing")
                    self._set(status, "indexing")
            finally:
                if self._child.poll() is None:
                    self._child.kill()
                    self._child.wait()
            stdout.seek(0)
            stderr.seek(0)
            out, err = stdout.read(), stderr.read()
        if self._child.returncode != 0:
            tail = err.strip().splitlines()[-3:] if err else []
            raise BuildError(f"build process exited {self._child.returncode}: {' '.join(tail)}")
        return json.loads(out.strip().splitlines()[-1])


def replay(live: qe.EdgeShard, built: qe.EdgeShard, journal: list[tuple]) -> None:
    """Bring `built` up to `live`: each journalled upsert copies the point's current state from
    `live` (absent there: deleted later, and a later journalled delete says so); deletes and
    payload indexes are applied as they were."""
    for op, *args in journal:
        if op == "upsert":
            for lo in range(0, len(args[0]), _REPLAY_PAGE):
                ids = args[0][lo : lo + _REPLAY_PAGE]
                records = live.retrieve(ids, with_payload=True, with_vector=True)
                points = [qe.Point(r.id, r.vector, r.payload or {}) for r in records]
                if points:
                    built.update(qe.UpdateOperation.upsert_points(points))
        elif op == "delete_ids":
            built.update(qe.UpdateOperation.delete_points(args[0]))
        elif op == "delete":
            built.update(qe.UpdateOperation.delete_points_by_filter(args[0]))
        elif op == "index":
            built.update(qe.UpdateOperation.create_field_index(*args))


def repair(collections_dir: os.PathLike) -> list[str]:
    """Finish or undo what a killed build left, on open; the collections to build again."""
    root = os.fspath(collections_dir)
    again = []
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if entry.endswith(OLD):
            base = path[: -len(OLD)]
            if os.path.isdir(base):
                shutil.rmtree(path)  # the swap happened; only the old copy's removal did not
            else:
                os.replace(path, base)  # killed between the two renames: the old one serves
        elif entry.endswith(BUILDING):
            shutil.rmtree(path)
            again.append(entry[: -len(BUILDING)])
    return again
