"""Vector storage: Qdrant behind the small `VectorStore` interface (issue 6, item 3).

    from server.store import QdrantStore
    store = QdrantStore("data/qdrant")           # embedded; or location=":memory:", or url=
    store.ensure_task("coco", 512, version)      # the first version of a task serves it
    store.upsert("coco", version, ids, vectors, payloads)
    hits = store.search("coco", version, query, top_k=10, filter={"split": "val"})
    store.ensure_task("coco", 512, new_version)  # re-index under the new prompt version,
    store.promote("coco", new_version)           # then switch atomically

- `base`: the interface, `Hit`, the errors, and the checks every implementation shares;
- `core`: the logic and both layouts, once, over a small `Backend` of Qdrant primitives;
- `qdrant`: `QdrantStore`, over qdrant-client (local mode in a directory, memory, or a server);
- `edge`: `EdgeStore`, over qdrant-edge-py (the Qdrant engine in-process, HNSW included).

qdrant_client and qdrant_edge are imported only when their store is first named.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from server.store.base import (
    LAYOUTS,
    ConflictError,
    Hit,
    InvalidInputError,
    Layout,
    StoreError,
    UnknownTaskError,
    UnknownVersionError,
    VectorStore,
)
from server.store.core import Backend, Store

if TYPE_CHECKING:
    from server.store.edge import EdgeStore
    from server.store.qdrant import QdrantStore

__all__ = [
    "LAYOUTS",
    "Backend",
    "ConflictError",
    "EdgeStore",
    "Hit",
    "InvalidInputError",
    "Layout",
    "QdrantStore",
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
