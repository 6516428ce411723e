"""`QdrantStore`: the store over `qdrant_client.QdrantClient`, embedded or remote.

One code path for three places the vectors can live:

- `path=`: qdrant-client's local mode, persisted in a data directory (SQLite, one commit per
  point), no server to start. Searches are brute force in numpy and payload indexes are
  ignored; qdrant-client advises a server beyond about 20k points per collection. One process
  at a time may open a directory (it is locked).
- `location=":memory:"`: the same, kept in memory (tests).
- `url=` (and `api_key=`): a Qdrant server or cluster, with HNSW, payload indexes, the
  `is_tenant` index and per-tenant graphs (`m=0, payload_m=16`) in the tenant layout.

Local mode pickles points into its SQLite files: open only data directories this server wrote.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator, Sequence
from os import PathLike
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models

from server.store.base import InvalidInputError, Layout, StoreError
from server.store.core import Must, Store

# Local mode warns that it ignores payload indexes; the store creates them for servers.
_LOCAL_INDEX_WARNING = "Payload indexes have no effect in the local Qdrant"
_SCROLL_PAGE = 256


def match_all(must: Must) -> models.Filter | None:
    if not must:
        return None
    conditions = [
        models.FieldCondition(key=key, match=models.MatchValue(value=value))
        for key, value in must.items()
    ]
    return models.Filter(must=conditions)


class QdrantBackend:
    """`Backend` over a QdrantClient. Local mode is not thread-safe (numpy arrays grow under
    concurrent upserts), so there every call holds one lock; a remote client needs none."""

    def __init__(self, client: QdrantClient, local: bool) -> None:
        self.client = client
        self._lock = threading.Lock() if local else contextlib.nullcontext()

    def collection_dim(self, name: str) -> int | None:
        with self._lock:
            if not self.client.collection_exists(name):
                return None
            vectors = self.client.get_collection(name).config.params.vectors
        if not isinstance(vectors, models.VectorParams):
            raise StoreError(f"collection {name!r} has named vectors: not made by this store")
        return vectors.size

    def create_collection(
        self, name: str, dim: int, indexes: Sequence[tuple[str, bool]], tenant: bool
    ) -> None:
        # Tenant layout: no global graph, one per tenant value, since no search crosses tasks
        # (Qdrant's multitenancy guide). Local mode ignores HNSW settings.
        hnsw = models.HnswConfigDiff(m=0, payload_m=16) if tenant else None
        vectors = models.VectorParams(size=dim, distance=models.Distance.COSINE)
        with self._lock, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_LOCAL_INDEX_WARNING)
            self.client.create_collection(name, vectors_config=vectors, hnsw_config=hnsw)
            for field, is_tenant in indexes:
                schema = models.KeywordIndexParams(
                    type=models.KeywordIndexType.KEYWORD, is_tenant=is_tenant or None
                )
                self.client.create_payload_index(name, field, field_schema=schema, wait=True)

    def drop_collection(self, name: str) -> None:
        with self._lock:
            self.client.delete_collection(name)

    def upsert(self, name: str, ids: list[str], vectors: np.ndarray, payloads: list[dict]) -> None:
        batch = models.Batch(ids=ids, vectors=vectors.tolist(), payloads=payloads)
        with self._lock:
            self.client.upsert(name, points=batch, wait=True)

    def query(self, name: str, vector: np.ndarray, must: Must, limit: int) -> list[tuple]:
        with self._lock:
            points = self.client.query_points(
                name, query=vector.tolist(), query_filter=match_all(must), limit=limit
            ).points
        return [(point.score, point.payload or {}) for point in points]

    def count(self, name: str, must: Must) -> int:
        with self._lock:
            return self.client.count(name, count_filter=match_all(must), exact=True).count

    def delete(self, name: str, must: Must) -> None:
        selector = models.FilterSelector(filter=match_all(must))
        with self._lock:
            self.client.delete(name, points_selector=selector, wait=True)

    def retrieve(self, name: str, ids: list[str]) -> list[dict]:
        with self._lock:
            records = self.client.retrieve(name, ids, with_payload=True)
        return [record.payload or {} for record in records]

    def scroll(self, name: str, must: Must) -> list[dict]:
        return [payload for page in self._pages(name, match_all(must)) for payload in page]

    def _pages(self, name: str, filter: models.Filter) -> Iterator[list[dict]]:
        offset = None
        while True:
            with self._lock:
                records, offset = self.client.scroll(
                    name, scroll_filter=filter, limit=_SCROLL_PAGE, offset=offset
                )
            yield [record.payload or {} for record in records]
            if offset is None:
                return

    def alias_target(self, alias: str) -> str | None:
        with self._lock:
            aliases = self.client.get_aliases().aliases
        return next((a.collection_name for a in aliases if a.alias_name == alias), None)

    def set_alias(self, alias: str, target: str) -> None:
        # One request: Qdrant applies the delete and the create together, so no search sees
        # the alias missing ("delete alias if exists" also covers the first promote).
        operations = [
            models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)),
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=target, alias_name=alias)
            ),
        ]
        with self._lock:
            self.client.update_collection_aliases(change_aliases_operations=operations)

    def drop_alias(self, alias: str) -> None:
        operation = models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))
        with self._lock:
            self.client.update_collection_aliases(change_aliases_operations=[operation])

    def close(self) -> None:
        with self._lock:
            self.client.close()


class QdrantStore(Store):
    """The store over Qdrant: give exactly one of `path`, `location` (":memory:") or `url`."""

    def __init__(
        self,
        path: str | PathLike | None = None,
        *,
        location: str | None = None,
        url: str | None = None,
        api_key: str | None = None,
        layout: Layout = "collection-per-task",
        prefix: str = "lpi",
        batch_size: int = 256,
        timeout: int | None = None,
        prefer_grpc: bool = False,
    ) -> None:
        client = open_client(path, location, url, api_key, timeout, prefer_grpc)
        try:
            super().__init__(QdrantBackend(client, local=url is None), layout, prefix, batch_size)
        except BaseException:
            client.close()
            raise


def open_client(
    path: str | PathLike | None,
    location: str | None,
    url: str | None,
    api_key: str | None,
    timeout: int | None,
    prefer_grpc: bool,
) -> QdrantClient:
    given = [name for name, value in (("path", path), ("location", location), ("url", url))
             if value is not None]  # fmt: skip
    if len(given) != 1:
        raise InvalidInputError(f"give exactly one of path, location, url (got {given or 'none'})")
    if location is not None and location != ":memory:":
        raise InvalidInputError(f"location: {location!r}; use path= for a directory")
    if api_key is not None and url is None:
        raise InvalidInputError("api_key: only a server (url=) takes one")
    if url is not None:
        options: dict[str, Any] = {"api_key": api_key, "prefer_grpc": prefer_grpc}
        if timeout is not None:
            options["timeout"] = timeout
        return QdrantClient(url=url, **options)
    try:
        return QdrantClient(path=str(path)) if path is not None else QdrantClient(location)
    except RuntimeError as error:  # the directory is locked by another process
        raise StoreError(str(error)) from error
