"""Payload indexes: declared per task, or asked for by the first filter that needs one.

Without an index, a filtered search checks the filter point by point (Qdrant's HNSW also
loses its filtered-graph links), which at a million points takes from tens of milliseconds
(Qdrant Edge) to seconds (qdrant-client local mode, in Python). A keyword, integer or bool
index answers the filter from an inverted index and keeps filtered search in milliseconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, Literal

from server.store.contract import InvalidInputError, check_task, check_version
from server.store.payloads import check_filter, filter_key

log = logging.getLogger("lpi.store")

FieldKind = Literal["keyword", "integer", "bool"]
FIELD_KINDS: tuple[FieldKind, ...] = ("keyword", "integer", "bool")
COUNT_TTL_S = 10.0


def kind_of(value: str | int | bool) -> FieldKind:
    """The index a filter value needs (bool before int: True is an int in Python)."""
    if isinstance(value, bool):
        return "bool"
    return "integer" if isinstance(value, int) else "keyword"


def stored_field(key: str) -> str:
    """An index's field as a backend reports it, quotes dropped: `"group"` -> `group`."""
    return key[1:-1] if len(key) >= 2 and key[0] == key[-1] == '"' else key


class PayloadIndexes:
    """Store methods over the backend's `create_index(name, path, kind)` and
    `indexed_fields(name)`; mixed into `Store`, whose `_require_entry`, `_backend` and `_lock`
    they use."""

    warn_unindexed_above: int = 100_000
    declared: tuple[tuple[str, str, str], ...] = ()  # (task or "*", field, kind)

    def ensure_declared(self, task: str, version: str) -> None:
        """Create the declared payload indexes of this version once (at its first write, while
        the collection is small and an index is made at once)."""
        done = self.__dict__.setdefault("_declared_done", set())
        if (task, version) in done:
            return
        for name, field, kind in self.declared:
            if name in ("*", task):
                self.index_field(task, version, field, kind)  # type: ignore[arg-type]
        done.add((task, version))

    def request_index(self, task: str, version: str, field: str, kind: FieldKind) -> None:
        """Build an index a filter needs, once, off the caller's thread (a failure is logged:
        the searches keep answering, with their warning)."""
        requested = self.__dict__.setdefault("_index_requests", set())
        if (task, version, field) in requested:
            return
        requested.add((task, version, field))

        def build() -> None:
            try:
                self.index_field(task, version, field, kind)
            except Exception:
                requested.discard((task, version, field))
                log.exception("payload index failed", extra={"task": task, "field": field})

        threading.Thread(target=build, name="lpi-payload-index", daemon=True).start()

    def index_field(self, task: str, version: str, field: str, kind: FieldKind) -> None:
        """Create a payload index on top-level key `field` (idempotent)."""
        if kind not in FIELD_KINDS:
            raise InvalidInputError(f"kind: {kind!r} is not one of {FIELD_KINDS}", "kind")
        check_filter({field: "" if kind == "keyword" else 0})  # the key's own rules
        entry = self._require_entry(task, version)  # type: ignore[attr-defined]
        if field not in self.indexed_fields(task, version):
            self._backend.create_index(entry["collection"], filter_key(field), kind)  # type: ignore[attr-defined]
            log.info("payload index created", extra={"task": task, "field": field, "kind": kind})

    def indexed_fields(self, task: str, version: str) -> set[str]:
        entry = self._require_entry(task, version)  # type: ignore[attr-defined]
        found = self._backend.indexed_fields(entry["collection"])  # type: ignore[attr-defined]
        return {stored_field(name) for name in found}

    def _points(self, collection: str) -> int:
        """A collection's size, counted at most every COUNT_TTL_S seconds (local mode counts
        point by point: not on every filtered search)."""
        counts = self.__dict__.setdefault("_counts", {})  # collection -> (when, points)
        when, points = counts.get(collection, (-COUNT_TTL_S, 0))
        if time.monotonic() - when >= COUNT_TTL_S:
            points = self._backend.count(collection, {})  # type: ignore[attr-defined]
            counts[collection] = (time.monotonic(), points)
        return points

    def unindexed_filter(
        self, task: str, version: str, filter: Mapping[str, Any] | None
    ) -> dict[str, FieldKind]:
        """The keys of `filter` with no payload index, with the index each would need, when
        the version holds more than `warn_unindexed_above` points (smaller scans are fast)."""
        check_task(task)
        check_version(version)
        wanted = check_filter(filter)
        if not wanted:
            return {}
        entry = self._require_entry(task, version)  # type: ignore[attr-defined]
        known = self.__dict__.setdefault("_known_indexed", {})  # collection -> indexed fields
        if set(wanted) <= known.get(entry["collection"], set()):
            return {}  # the common case, without asking the backend on every search
        indexed = self.indexed_fields(task, version)
        known[entry["collection"]] = indexed
        missing = set(wanted) - indexed
        if not missing:
            return {}
        if self._points(entry["collection"]) <= self.warn_unindexed_above:
            return {}
        return {key: kind_of(wanted[key]) for key in sorted(missing)}
