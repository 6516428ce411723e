"""Which prompt versions of which tasks are loaded, and which requests hold them. No I/O.

Each task has an *active* version (the newest loaded: `/embed` and `/index` use it) and a
*serving* version (the store's: `/search` embeds its query with it, so a search only ever
compares vectors of one prompt version). After a replace the two differ until the caller
re-indexes and promotes; both stay loaded meanwhile.

A request *pins* the versions it uses for its whole life, so a swap never changes a request
mid-flight: a version that is neither active nor serving any more leaves (the `drop` callback,
the engine's remove) only when its last pin is released. An unload first *closes* the task (new
pins are refused as if it were gone), waits until the pins it had are released, and only then
removes it: nothing a request holds ever leaves under it, its vectors included.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from export import TaskArtifact
from server.engine import Key
from server.registry.errors import TaskNotLoadedError, VersionNotLoadedError

Purpose = Literal["active", "serving"]


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
    closing: bool = False  # an unload waits for its pins: no new ones

    def needed(self) -> set[str]:
        return {self.active} | ({self.serving} if self.serving else set())

    def pins(self) -> int:
        return sum(loaded.pins for loaded in self.versions.values())


class VersionTable:
    """Tasks by name -> their loaded versions and pins; thread-safe.

    `lock` (a condition over a reentrant lock) guards everything here; callers that read or
    change several things at once hold it. `generation` grows whenever an active version
    changes, so derived data (routing keys) knows when to rebuild.
    """

    def __init__(self, drop: Callable[[Key], None], changed: Callable[[], None]) -> None:
        self.lock = threading.Condition(threading.RLock())
        self.tasks: dict[str, TaskState] = {}
        self.generation = 0
        self._drop = drop  # a version leaves: the engine forgets it
        self._changed = changed  # the set of loaded versions changed (gauges)

    def names(self) -> list[str]:
        with self.lock:
            return sorted(self.tasks)

    def require(self, task: str, *, for_pin: bool = False) -> TaskState:
        """The task's state; a closing task counts as gone for a new pin."""
        with self.lock:
            state = self.tasks.get(task)
            if state is None or (for_pin and state.closing):
                why = "is being unloaded" if state is not None else "is not loaded"
                loaded = sorted(n for n, s in self.tasks.items() if not s.closing)
                raise TaskNotLoadedError(
                    f"task {task!r} {why} (loaded: {loaded or 'none'})", field="task"
                )
            return state

    def loaded_count(self) -> int:
        """How many versions are loaded, over every task."""
        with self.lock:
            return sum(len(s.versions) for s in self.tasks.values())

    # -- pins ----------------------------------------------------------------------------------

    @contextmanager
    def pin_many(self, tasks: Sequence[str], purpose: Purpose) -> Iterator[dict[str, Key]]:
        """Pin each task's active or serving version for the caller's lifetime; task -> key."""
        pinned: list[tuple[str, str]] = []
        with self.lock:
            try:
                for task in dict.fromkeys(tasks):
                    state = self.require(task, for_pin=True)
                    version = state.active if purpose == "active" else state.serving
                    if version is None or version not in state.versions:
                        raise VersionNotLoadedError(
                            f"task {task!r}: the store serves prompt version {state.serving!r}, "
                            "which is not loaded; load it, promote the loaded version, or search "
                            "with accept_mismatch",
                            field="task",
                        )
                    state.versions[version].pins += 1
                    pinned.append((task, version))
            except BaseException:  # a later task refused: the earlier ones' pins go back
                for task, version in pinned:
                    self.unpin(task, version)
                raise
        try:
            yield {task: (task, version) for task, version in pinned}
        finally:
            with self.lock:
                for task, version in pinned:
                    self.unpin(task, version)

    def hold(self, task: str, version: str) -> LoadedVersion | None:
        """Pin a loaded version for an admin change (a load, a promote), if it is loaded."""
        with self.lock:
            state = self.tasks.get(task)
            held = state.versions.get(version) if state else None
            if held is not None:
                held.pins += 1
            return held

    def unpin(self, task: str, version: str) -> None:
        """Release one pin; a version nothing needs any more leaves."""
        with self.lock:
            state = self.tasks.get(task)
            loaded = state.versions.get(version) if state else None
            if loaded is not None:
                loaded.pins -= 1
                self.settle(state)
                self.lock.notify_all()  # an unload may be waiting for this task's pins

    def settle(self, state: TaskState) -> None:
        """Drop versions that are neither active nor serving and hold no pin."""
        with self.lock:
            for version in list(state.versions):
                if version not in state.needed() and state.versions[version].pins == 0:
                    del state.versions[version]
                    self._drop((state.name, version))
                    self._changed()

    # -- changes -------------------------------------------------------------------------------

    def switch(self, task: str, held: LoadedVersion, serving: str) -> str | None:
        """Make `held` the task's active version; returns the previous one."""
        with self.lock:
            state = self.tasks.get(task)
            previous = state.active if state else None
            if state is None:
                state = self.tasks[task] = TaskState(task, held.version, serving)
            state.versions[held.version] = held
            state.active, state.serving = held.version, serving
            self.generation += 1
            self._changed()
            return previous

    def set_serving(self, task: str, version: str) -> None:
        with self.lock:
            state = self.tasks.get(task)
            if state is not None:
                state.serving = version

    def add_restored(self, task: str, loaded: LoadedVersion, active: str, serving: str) -> None:
        """A version read back at start: it becomes active if registry.json says so (or if the
        task has no usable active version yet)."""
        with self.lock:
            state = self.tasks.get(task)
            if state is None:
                state = self.tasks[task] = TaskState(task, loaded.version, serving)
            state.versions[loaded.version] = loaded
            if loaded.version == active or state.active not in state.versions:
                state.active = loaded.version
            state.serving = serving
            self.generation += 1
            self._changed()

    def settle_all(self) -> None:
        with self.lock:
            for state in self.tasks.values():
                self.settle(state)

    # -- unloading -----------------------------------------------------------------------------

    def close(self, task: str) -> None:
        """Refuse new pins on `task` (its active version stops counting for routing)."""
        with self.lock:
            self.require(task, for_pin=True).closing = True
            self.generation += 1

    def reopen(self, task: str) -> None:
        with self.lock:
            state = self.tasks.get(task)
            if state is not None and state.closing:
                state.closing = False
                self.generation += 1

    def wait_unpinned(self, task: str, timeout: float) -> int:
        """Wait until no request holds `task` (at most `timeout` s); returns the pins left."""
        with self.lock:
            state = self.tasks[task]
            self.lock.wait_for(lambda: state.pins() == 0, timeout=timeout)
            return state.pins()

    def remove(self, task: str) -> list[str]:
        """Forget a closed task that no request holds; returns its versions."""
        with self.lock:
            state = self.tasks[task]
            if not state.closing or state.pins():
                raise RuntimeError(f"task {task!r}: remove() only after a drained close()")
            del self.tasks[task]
            for version in state.versions:
                self._drop((task, version))
            self.generation += 1
            self._changed()
            return sorted(state.versions)
