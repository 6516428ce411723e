"""The store's logic, written once over a small `Backend` of Qdrant-shaped primitives.

Two layouts:

- collection-per-task (default): one collection per task version, `lpi_{task}@{version}`,
  and an alias `lpi_{task}` naming the serving one; promoting a version switches the alias in
  one atomic request.
- tenant: one collection per vector size, `lpi@tenants-d{D}`, shared by every task version of
  that size, with `task` a keyword index marked `is_tenant` (Qdrant advises against hundreds
  of collections). A Qdrant alias names a collection, not a slice of one, so the serving
  version is a point of the catalog, which one upsert replaces atomically.

Both keep a catalog collection `lpi@catalog` (one point per task version: its dimension and
collection; one per maker of its vectors, `provenance`; the layout the store was made with),
so nothing is parsed out of collection names
and several server processes sharing a Qdrant server see the same state. Every point carries
`task`, `prompt_version` and the caller's `id`. A search reads one version's vectors only: its
own collection in the first layout, a filter on task and version in the second (the first
layout does not filter too: local mode checks filters point by point in Python, which costs
about 20 ms per 1000 points). Dimensions: B points, D the vector size.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np

from server.store.bulk import ExistingIds
from server.store.contract import (
    ID_KEY,
    TASK_KEY,
    VERSION_KEY,
    ConflictError,
    Hit,
    InvalidInputError,
    Layout,
    MissingCollectionError,
    UnknownTaskError,
    UnknownVersionError,
    alias_name,
    catalog_id,
    catalog_name,
    check_dim,
    check_ids,
    check_layout,
    check_offset,
    check_prefix,
    check_task,
    check_top_k,
    check_vector,
    check_vectors,
    check_version,
    collection_name,
    point_id,
    tenant_collection_name,
)
from server.store.fields import PayloadIndexes
from server.store.payloads import (
    check_filter,
    check_payloads,
    filter_key,
    readable,
    user_payload,
)
from server.store.provenance import Origins
from server.store.tuning import SearchOptions

PLAIN = SearchOptions()
Must = Mapping[str, str | int | bool]  # payload key -> exact value, all must match
Page = tuple[list[dict], str | None]  # payloads, and the offset of the next page
# Keyword indexes (field, is_tenant) of the shared collections: the filter every search carries
# there is answered from the index instead of reading each point's payload.
TENANT_INDEXES = ((TASK_KEY, True), (VERSION_KEY, False))
CATALOG_INDEXES = (("kind", False), (TASK_KEY, False))
CATALOG_VECTOR = np.ones((1, 1), dtype=np.float32)  # catalog points carry no meaning in vectors


@contextmanager
def vanished_as_unknown(task: str) -> Iterator[None]:
    """A collection deleted between the catalog read and the backend call (an unload with
    delete_vectors, or another process sharing the Qdrant server) means the task is gone."""
    try:
        yield
    except MissingCollectionError as error:
        raise UnknownTaskError(
            f"task {task!r} was deleted from the store while this request ran", "task"
        ) from error


class Backend(Protocol):
    """Qdrant-shaped primitives: named cosine collections of uuid-keyed points, and aliases."""

    def collection_dim(self, name: str) -> int | None:
        """The vector size of collection `name`, or None if there is none."""

    def create_collection(
        self, name: str, dim: int, indexes: Sequence[tuple[str, bool]], tenant: bool
    ) -> None: ...

    def drop_collection(self, name: str) -> None: ...

    def upsert(self, name: str, ids: list[str], vectors: np.ndarray, payloads: list[dict]) -> None:
        """Write B points [B, D] and return once they are durable."""

    def query(
        self, name: str, vector: np.ndarray, must: Must, limit: int, options: SearchOptions
    ) -> list[tuple]:
        """(score, payload) of the `limit` nearest points matching `must`, best first."""

    def count(self, name: str, must: Must) -> int: ...

    def delete(self, name: str, must: Must) -> None: ...

    def retrieve(self, name: str, ids: list[str]) -> list[dict]:
        """Payloads of those of `ids` that exist."""

    def scroll(self, name: str, must: Must) -> list[dict]:
        """Payloads of every point matching `must` (catalog-sized results only)."""

    def delete_ids(self, name: str, ids: list[str]) -> None:
        """Delete the points of these uuids (absent ones are no error)."""

    def page(self, name: str, must: Must, limit: int, offset: str | None) -> Page:
        """Up to `limit` payloads matching `must` from point `offset` on (uuid order), and the
        uuid the next page starts at (None after the last)."""

    def alias_target(self, alias: str) -> str | None: ...

    def set_alias(self, alias: str, target: str) -> None:
        """Create or move `alias` in one atomic step."""

    def drop_alias(self, alias: str) -> None: ...

    def close(self) -> None: ...


class Store(PayloadIndexes, ExistingIds, Origins):
    """`VectorStore` over any `Backend`.

    Thread safety: calls that change what exists (ensure, promote, delete) are serialised by a
    lock within one process; searches and upserts run concurrently as far as the backend
    allows. Across processes, only a Qdrant server serialises anything.
    """

    def __init__(
        self,
        backend: Backend,
        layout: Layout = "collection-per-task",
        prefix: str = "lpi",
        batch_size: int = 256,
    ) -> None:
        self.layout = check_layout(layout)
        self.prefix = check_prefix(prefix)
        self.batch_size = batch_size
        self._backend = backend
        self._catalog = catalog_name(self.prefix)
        self._lock = threading.RLock()
        self._open_catalog()

    # -- the interface -------------------------------------------------------------------------

    def ensure_task(self, task: str, dim: int, version: str) -> None:
        check_task(task)
        check_version(version)
        check_dim(dim)
        with self._lock:
            entry = self._entry(task, version)
            if entry is not None and entry["dim"] != dim:
                raise ConflictError(
                    f"dim: version {version!r} of task {task!r} holds vectors of size "
                    f"{entry['dim']}, not {dim}",
                    "dim",
                )
            name = entry["collection"] if entry else self._collection_for(task, version, dim)
            self._ensure_collection(name, dim)
            if entry is None:
                record = {"kind": "version", TASK_KEY: task, VERSION_KEY: version}
                record |= {"dim": dim, "collection": name}
                self._write_catalog(catalog_id("version", task, version), record)
            if self._serving(task) is None:
                self._set_serving(task, version)

    def upsert(
        self,
        task: str,
        version: str,
        ids: Sequence[str] | None,
        vectors: Any,
        payloads: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[str]:
        entry = self._require_entry(task, version)
        rows = check_vectors(vectors, entry["dim"])  # [B, D]
        ids = check_ids(ids, len(rows))
        stamped = [
            p | {TASK_KEY: task, VERSION_KEY: version, ID_KEY: id}
            for p, id in zip(check_payloads(payloads, len(rows)), ids, strict=True)
        ]
        points = [point_id(task, version, id) for id in ids]
        with vanished_as_unknown(task):
            for start in range(0, len(rows), self.batch_size):
                chunk = slice(start, start + self.batch_size)
                batch = (points[chunk], rows[chunk], stamped[chunk])
                self._backend.upsert(entry["collection"], *batch)
        return ids

    def search(
        self,
        task: str,
        version: str,
        vector: Any,
        top_k: int = 10,
        filter: Mapping[str, Any] | None = None,
        *,
        accept_mismatch: bool = False,
        options: SearchOptions | None = None,
    ) -> list[Hit]:
        check_task(task)
        check_version(version)
        top_k = check_top_k(top_k)
        must = {filter_key(key): value for key, value in check_filter(filter).items()}
        entry = self._entry(task, version)
        if entry is None:
            entry = self._mismatch_entry(task, version, accept_mismatch)
        query = check_vector(vector, entry["dim"])  # [D]
        with vanished_as_unknown(task):
            rows = self._backend.query(
                entry["collection"], query, must | self._scope(entry), top_k, options or PLAIN
            )
        stored = entry[VERSION_KEY]
        return [
            Hit(readable(p[ID_KEY]), float(score), user_payload(p), stored) for score, p in rows
        ]

    def serving_version(self, task: str) -> str:
        check_task(task)
        version = self._serving(task)
        if version is None:
            self._require_task(task)
            raise ConflictError(f"task {task!r} has no serving version: promote one", "task")
        return version

    def versions(self, task: str) -> list[str]:
        return sorted(entry[VERSION_KEY] for entry in self._require_task(task))

    def promote(self, task: str, version: str) -> None:
        with self._lock:
            self._require_entry(task, version)
            self._set_serving(task, version)

    def count(self, task: str, version: str, filter: Mapping[str, Any] | None = None) -> int:
        entry = self._require_entry(task, version)
        must = self._must(entry, filter)
        with vanished_as_unknown(task):
            return self._backend.count(entry["collection"], must)

    def list_points(
        self,
        task: str,
        version: str,
        filter: Mapping[str, Any] | None = None,
        limit: int = 100,
        offset: str | None = None,
    ) -> tuple[list[tuple[str, dict]], str | None]:
        """One page of (id, payload) of this version's points (point order, stable while
        nothing is written); the offset of the next page, or None after the last."""
        entry = self._require_entry(task, version)
        must = self._must(entry, filter)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidInputError(f"limit: {limit!r} is not an integer >= 1", "limit")
        if offset is not None:
            offset = check_offset(offset)
        with vanished_as_unknown(task):
            rows, after = self._backend.page(entry["collection"], must, limit, offset)
        return [(readable(p[ID_KEY]), user_payload(p)) for p in rows], after

    def delete_points(
        self,
        task: str,
        version: str,
        ids: Sequence[str] | None = None,
        filter: Mapping[str, Any] | None = None,
    ) -> int:
        """Delete points by the caller's ids or by a payload filter (exactly one); returns how
        many existed (counted just before the delete)."""
        entry = self._require_entry(task, version)
        if (ids is None) == (filter is None):
            raise InvalidInputError("ids: give exactly one of ids or filter", "ids")
        with vanished_as_unknown(task):
            if ids is not None:
                points = [point_id(task, version, id) for id in check_ids(ids, len(ids))]
                found = len(self._backend.retrieve(entry["collection"], points))
                self._backend.delete_ids(entry["collection"], points)
                return found
            must = self._must(entry, filter)
            found = self._backend.count(entry["collection"], must)
            self._backend.delete(entry["collection"], must)
            return found

    def delete_version(self, task: str, version: str) -> None:
        with self._lock:
            entry = self._require_entry(task, version)
            if self._serving(task) == version:
                raise ConflictError(
                    f"version {version!r} serves task {task!r}: promote another first, "
                    "or delete the task",
                    "version",
                )
            self._forget(entry, keep_vectors=False)

    def delete_task(self, task: str, keep_vectors: bool = False) -> None:
        with self._lock:
            entries = self._require_task(task)
            self._drop_serving(task)
            for entry in entries:
                self._forget(entry, keep_vectors)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the catalog -----------------------------------------------------------------------------

    def _open_catalog(self) -> None:
        if self._backend.collection_dim(self._catalog) is None:
            self._backend.create_collection(self._catalog, 1, CATALOG_INDEXES, tenant=False)
        found = self._backend.retrieve(self._catalog, [catalog_id("layout")])
        if not found:
            self._write_catalog(catalog_id("layout"), {"kind": "layout", "layout": self.layout})
        elif found[0]["layout"] != self.layout:
            raise ConflictError(
                f"layout: this store was made with layout {found[0]['layout']!r}, "
                f"not {self.layout!r}",
                "layout",
            )

    def _write_catalog(self, id: str, payload: dict) -> None:
        self._backend.upsert(self._catalog, [id], CATALOG_VECTOR, [payload])

    def _entry(self, task: str, version: str) -> dict | None:
        found = self._backend.retrieve(self._catalog, [catalog_id("version", task, version)])
        return found[0] if found else None

    def _require_task(self, task: str) -> list[dict]:
        check_task(task)
        entries = self._backend.scroll(self._catalog, {"kind": "version", TASK_KEY: task})
        if not entries:
            raise UnknownTaskError(f"task {task!r} is not in the store", "task")
        return entries

    def _require_entry(self, task: str, version: str) -> dict:
        check_task(task)
        check_version(version)
        entry = self._entry(task, version)
        if entry is None:
            self._require_task(task)
            raise UnknownVersionError(
                f"version: task {task!r} has no prompt version {version!r} in the store",
                "version",
            )
        return entry

    def _mismatch_entry(self, task: str, version: str, accept_mismatch: bool) -> dict:
        """The serving version's entry, when the caller accepts comparing across versions."""
        self._require_task(task)
        serving = self._serving(task)
        if not accept_mismatch or serving is None:
            raise UnknownVersionError(
                f"version: task {task!r} has no vectors of prompt version {version!r} (it "
                f"serves {serving!r}): index them and promote, or accept the mismatch",
                "version",
            )
        return self._require_entry(task, serving)

    def _forget(self, entry: dict, keep_vectors: bool) -> None:
        """Drop a version's vectors (unless kept), then its catalog entry, in that order: a crash
        between the two leaves an entry with no vectors, which ensure_task repairs."""
        if not keep_vectors:
            if self.layout == "tenant":
                self._backend.delete(entry["collection"], self._scope(entry))
            else:
                self._backend.drop_collection(entry["collection"])
        # Its entry and its makers' points (`provenance`) in one delete; no serving point names it
        version_points = {TASK_KEY: entry[TASK_KEY], VERSION_KEY: entry[VERSION_KEY]}
        self._backend.delete(self._catalog, version_points)

    # -- layouts ---------------------------------------------------------------------------------

    def _must(self, entry: dict, filter: Mapping[str, Any] | None) -> dict:
        """A caller's exact-match filter, kept to one version's points."""
        must = {filter_key(key): value for key, value in check_filter(filter).items()}
        return must | self._scope(entry)

    def _scope(self, entry: dict) -> dict[str, str]:
        """The filter that keeps to one version's points: none where it has its collection."""
        if self.layout == "tenant":
            return {TASK_KEY: entry[TASK_KEY], VERSION_KEY: entry[VERSION_KEY]}
        return {}

    def _collection_for(self, task: str, version: str, dim: int) -> str:
        if self.layout == "tenant":
            return tenant_collection_name(self.prefix, dim)
        return collection_name(self.prefix, task, version)

    def _ensure_collection(self, name: str, dim: int) -> None:
        found = self._backend.collection_dim(name)
        if found is None:
            tenant = self.layout == "tenant"
            indexes = TENANT_INDEXES if tenant else ()
            self._backend.create_collection(name, dim, indexes, tenant=tenant)
        elif found != dim:
            raise ConflictError(
                f"dim: collection {name!r} holds vectors of size {found}, not {dim}", "dim"
            )

    def _serving(self, task: str) -> str | None:
        if self.layout == "tenant":
            found = self._backend.retrieve(self._catalog, [catalog_id("serving", task)])
            return found[0][VERSION_KEY] if found else None
        target = self._backend.alias_target(alias_name(self.prefix, task))
        if target is None:
            return None
        head = collection_name(self.prefix, task, "")
        if not target.startswith(head):
            raise ConflictError(f"alias {alias_name(self.prefix, task)!r} names {target!r}", "task")
        return target[len(head) :]

    def _set_serving(self, task: str, version: str) -> None:
        if self.layout == "tenant":
            record = {"kind": "serving", TASK_KEY: task, VERSION_KEY: version}
            self._write_catalog(catalog_id("serving", task), record)
        else:
            target = collection_name(self.prefix, task, version)
            self._backend.set_alias(alias_name(self.prefix, task), target)

    def _drop_serving(self, task: str) -> None:
        if self.layout == "tenant":
            self._backend.delete(self._catalog, {"kind": "serving", TASK_KEY: task})
        else:
            self._backend.drop_alias(alias_name(self.prefix, task))
