"""Vector storage: Qdrant behind the small `VectorStore` interface.

    from server.store import QdrantStore
    store = QdrantStore("data/qdrant")           # embedded; or location=":memory:", or url=
    store.ensure_task("coco", 512, version)      # the first version of a task serves it
    store.upsert("coco", version, ids, vectors, payloads)
    hits = store.search("coco", version, query, top_k=10, filter={"split": "val"})
    store.ensure_task("coco", 512, new_version)  # re-index under the new prompt version,
    store.promote("coco", new_version)           # then switch atomically

- `contract`: the `VectorStore` protocol, `Hit`, the errors, names, and the checks of ids,
  vectors and arguments every implementation shares;
- `payloads`: what a payload and a filter may hold, and the escaping of what a search returns;
- `task_versions`: `Store`, the logic of task versions in collections (catalog, serving
  version, both layouts), once, over a small `Backend` of Qdrant primitives;
- `qdrant`: `QdrantStore`, over qdrant-client (local mode in a directory, memory, or a server);
- `edge`: `EdgeStore`, over qdrant-edge-py (the Qdrant engine in-process, HNSW included);
- `tuning`: `IndexSettings` (HNSW, int8 quantisation, on-disk vectors, shards and replicas of
  new collections) and `SearchOptions` (exact, hnsw_ef per search);
- `building`, `build_worker`: the edge store's index builds, in a child process, swapped in;
- `fields`: payload indexes, declared or asked for by a filter; `bulk`: resumable writes and
  precomputed vectors; `configure`: the server's settings -> a store.

qdrant_client and qdrant_edge are imported only when their store is first named.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from server.store.contract import (
    LAYOUTS,
    ConflictError,
    Hit,
    InvalidInputError,
    Layout,
    MissingCollectionError,
    StoreError,
    UnknownTaskError,
    UnknownVersionError,
    VectorStore,
)
from server.store.task_versions import Backend, Store
from server.store.tuning import IndexSettings, SearchOptions

if TYPE_CHECKING:
    from server.store.edge import EdgeStore
    from server.store.qdrant import QdrantStore

__all__ = [
    "LAYOUTS",
    "Backend",
    "ConflictError",
    "EdgeStore",
    "Hit",
    "IndexSettings",
    "InvalidInputError",
    "Layout",
    "MissingCollectionError",
    "QdrantStore",
    "SearchOptions",
    "Store",
    "StoreError",
    "UnknownTaskError",
    "UnknownVersionError",
    "VectorStore",
]

_LAZY = {"QdrantStore": "server.store.qdrant", "EdgeStore": "server.store.edge"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
