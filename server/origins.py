"""Which engine and dtype made the stored vectors, and searches that query them in another.

Every /index records its makers in the store (`server.store.provenance`) before it writes the
vectors. A search whose query the engine computed in another dtype than the stored vectors were
made in still works (the two differ by ~1e-4 in cosine: tests/test_dtype.py), but rankings can
move at that scale, so it is counted (`lpi_search_dtype_mismatch_total`) and logged, once per
task version and pair of makers, as a structured warning.

The makers of each task version are cached here, so a search reads nothing from the store (a
network round trip against a Qdrant server) once they are known, and an /index writes only a
maker not yet known. The cache is dropped for a task when it is unloaded, updated by each
record, and trusted for `CACHE_TTL_S` at most: what another process sharing the store records
or deletes is seen here within that time.
"""

from __future__ import annotations

import logging
import threading
import time

from starlette.concurrency import run_in_threadpool

from server.store import StoreError
from server.store.provenance import EXTERNAL, origin, origin_dtype

log = logging.getLogger("server.origins")
CACHE_TTL_S = 60.0


class OriginWatch:
    """The serving engine's label (`torch/float32`), recorded on writes, compared on searches."""

    def __init__(self, engine, store, metrics=None, clock=time.monotonic) -> None:
        self.dtype = str(getattr(engine, "dtype", "float32"))
        self.label = origin(str(getattr(engine, "name", "torch")), self.dtype)
        self.store = store
        self.metrics = metrics
        self._clock = clock
        self._warned: set[tuple[str, str, str]] = set()
        self._known: dict[tuple[str, str], tuple[frozenset[str], float]] = {}
        self._lock = threading.Lock()

    def record(self, task: str, version: str, modelled: bool, given: bool) -> None:
        """Note the makers of one /index request's vectors (this engine's when it computed
        some, `external` when some were sent) before they are written; makers known to be
        recorded are not written again. With nothing cached, the stored makers are read once
        after the write, so a run of /index requests costs the store no further round trip
        until the cache expires. A store without the record (a test double) is left alone."""
        record_origin = getattr(self.store, "record_origin", None)
        if record_origin is None:
            return
        makers = {label for label, made in ((self.label, modelled), (EXTERNAL, given)) if made}
        known = self._cached(task, version)
        for maker in sorted(makers - (known or frozenset())):
            record_origin(task, version, maker)
        if known is not None or self._read(task, version) is not None:
            self._remember(task, version, makers)

    def forget(self, task: str) -> None:
        """Drop what is cached of the task's versions (its unload, its vectors' delete)."""
        with self._lock:
            for key in [key for key in self._known if key[0] == task]:
                del self._known[key]

    async def after_search(self, task: str, version: str, query=None) -> list[str]:
        """`searched`, off the event loop only when the store must be read."""
        if getattr(query, "vector", None) is None and self._cached(task, version) is None:
            return await run_in_threadpool(self.searched, task, version, query)
        return self.searched(task, version, query)

    def searched(self, task: str, version: str, query=None) -> list[str]:
        """After a search: when this engine computed its query (`query` is not a vector), the
        stored makers of another dtype (counted and logged), or [] when they agree or are
        unknown. A query sent as a vector has no dtype the server knows."""
        if getattr(query, "vector", None) is not None:
            return []
        made = self._made_by(task, version)
        other = [m for m in sorted(made) if m != EXTERNAL and origin_dtype(m) != self.dtype]
        if not other:
            return []
        made_by = ",".join(other)
        if self.metrics is not None:
            self.metrics.dtype_mismatch.labels(task, made_by, self.label).inc()
        with self._lock:
            first = (task, version, made_by) not in self._warned
            self._warned.add((task, version, made_by))
        if first:
            log.warning(
                "task %s: search in %s over vectors made by %s",
                task,
                self.label,
                made_by,
                extra={
                    "task": task,
                    "prompt_version": version,
                    "made_by": other,
                    "searched_with": self.label,
                },
            )
        return other

    def _made_by(self, task: str, version: str) -> frozenset[str]:
        """The version's makers: cached, else read from the store (and cached); none when the
        store keeps no record or the version vanished meanwhile (the search said what it
        found)."""
        known = self._cached(task, version)
        if known is None:
            known = self._read(task, version)
        return frozenset() if known is None else known

    def _read(self, task: str, version: str) -> frozenset[str] | None:
        """The version's makers as the store holds them now (then cached), or None when the
        store keeps no record or the version vanished meanwhile."""
        read = getattr(self.store, "origins", None)
        if read is None:
            return None
        try:
            made = frozenset(read(task, version))
        except StoreError:
            return None
        self._remember(task, version, made)
        return made

    def _cached(self, task: str, version: str) -> frozenset[str] | None:
        with self._lock:
            found = self._known.get((task, version))
        if found is None or self._clock() - found[1] > CACHE_TTL_S:
            return None
        return found[0]

    def _remember(self, task: str, version: str, makers) -> None:
        """Add makers to what is known; a known entry keeps its age (a read that raced a
        record adds to it rather than replacing it)."""
        now = self._clock()
        with self._lock:
            found = self._known.get((task, version))
            if found is not None and now - found[1] <= CACHE_TTL_S:
                self._known[task, version] = (found[0] | frozenset(makers), found[1])
            else:
                self._known[task, version] = (frozenset(makers), now)
