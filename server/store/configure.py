"""The configured store: the server's settings -> one `VectorStore`, index settings included.

Each store's client is imported only when chosen: qdrant-edge-py is an optional extra.
"""

from __future__ import annotations

from collections.abc import Callable

from server.store.tuning import IndexSettings


def index_settings(settings) -> IndexSettings:
    """The HNSW, quantisation and placement settings of new collections."""
    return IndexSettings(
        m=settings.hnsw_m,
        ef_construct=settings.hnsw_ef_construct,
        hnsw_ef=settings.hnsw_ef,
        exact_below=settings.exact_below,
        quantization=settings.quantization,
        on_disk=settings.vectors_on_disk,
        shard_number=settings.shards,
        replication_factor=settings.replicas,
    )


def declared_indexes(settings, task: str) -> list[tuple[str, str]]:
    """(field, kind) of the payload indexes `settings.payload_indexes` declares for `task`."""
    out = []
    for spec in settings.payload_indexes:
        name, field, kind = spec.split(":")
        if name in ("*", task) and (field, kind) not in out:
            out.append((field, kind))
    return out


def open_store(settings, on_build: Callable | None = None):
    """local mode or edge in data_dir, memory, or a server (or cluster) by URL."""
    layout, index = settings.layout, index_settings(settings)
    if settings.store == "edge":
        from server.store.edge import EdgeStore

        store = EdgeStore(
            settings.data_dir / "edge",
            layout=layout,
            index=index,
            background_builds=settings.background_builds,
            on_build=on_build,
        )
    else:
        from server.store.qdrant import QdrantStore

        if settings.store == "memory":
            store = QdrantStore(location=":memory:", layout=layout, index=index)
        elif settings.store == "local":
            store = QdrantStore(settings.data_dir / "qdrant", layout=layout, index=index)
        else:
            key = settings.store_api_key.get_secret_value() if settings.store_api_key else None
            store = QdrantStore(url=settings.store, api_key=key, layout=layout, index=index)
    store.warn_unindexed_above = settings.warn_unindexed_above
    store.declared = tuple(tuple(spec.split(":")) for spec in settings.payload_indexes)
    return store
