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
from qdrant_client.http.exceptions import UnexpectedResponse

from server.store.contract import InvalidInputError, Layout, MissingCollectionError, StoreError
from server.store.task_versions import Must, Page, Store
from server.store.tuning import IndexSettings, SearchOptions

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


def collection_config(index: IndexSettings, dim: int, tenant: bool) -> dict[str, Any]:
    """create_collection's arguments. Tenant layout: no global graph, one per tenant value,
    since no search crosses tasks (Qdrant's multitenancy guide). Local mode ignores HNSW,
    quantisation, shards and replicas; a server or cluster applies them."""
    hnsw = models.HnswConfigDiff(
        m=0 if tenant else index.m,
        payload_m=index.m if tenant else None,
        ef_construct=index.ef_construct,
        full_scan_threshold=index.full_scan_kb(dim),
    )
    quantization = None
    if index.quantization == "int8":
        scalar = models.ScalarQuantizationConfig(
            type=models.ScalarType.INT8, quantile=0.99, always_ram=True
        )
        quantization = models.ScalarQuantization(scalar=scalar)
    return {
        "vectors_config": models.VectorParams(
            size=dim, distance=models.Distance.COSINE, on_disk=index.on_disk or None
        ),
        "hnsw_config": hnsw,
        "quantization_config": quantization,
        "shard_number": index.shard_number,
        "replication_factor": index.replication_factor,
    }


def search_params(index: IndexSettings, options: SearchOptions) -> models.SearchParams:
    """The request's exactness and ef; int8 candidates rescored on the original vectors."""
    quantization = None
    if index.quantization == "int8":
        quantization = models.QuantizationSearchParams(
            ignore=not options.quantized, rescore=True, oversampling=index.oversampling
        )
    return models.SearchParams(
        hnsw_ef=options.hnsw_ef or index.hnsw_ef, exact=options.exact, quantization=quantization
    )


class QdrantBackend:
    """`Backend` over a QdrantClient. Local mode is not thread-safe (numpy arrays grow under
    concurrent upserts), so there every call holds one lock; a remote client needs none."""

    def __init__(self, client: QdrantClient, local: bool, index: IndexSettings | None = None):
        self.client = client
        self.index = index or IndexSettings()
        self.local = local  # local mode is brute force: search parameters would only warn
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
        with self._lock, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_LOCAL_INDEX_WARNING)
            self.client.create_collection(name, **collection_config(self.index, dim, tenant))
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
        with self._lock, self._existing(name):
            self.client.upsert(name, points=batch, wait=True)

    def query(
        self, name: str, vector: np.ndarray, must: Must, limit: int, options: SearchOptions
    ) -> list[tuple]:
        params = None if self.local else search_params(self.index, options)
        with self._lock, self._existing(name):
            points = self.client.query_points(
                name,
                query=vector.tolist(),
                query_filter=match_all(must),
                limit=limit,
                search_params=params,
            ).points
        return [(point.score, point.payload or {}) for point in points]

    def create_index(self, name: str, path: str, kind: str) -> None:
        schema = {
            "keyword": models.PayloadSchemaType.KEYWORD,
            "integer": models.PayloadSchemaType.INTEGER,
            "bool": models.PayloadSchemaType.BOOL,
        }[kind]
        with self._lock, warnings.catch_warnings(), self._existing(name):
            warnings.filterwarnings("ignore", message=_LOCAL_INDEX_WARNING)
            self.client.create_payload_index(name, path, field_schema=schema, wait=True)

    def indexed_fields(self, name: str) -> set[str]:
        with self._lock, self._existing(name):
            return set(self.client.get_collection(name).payload_schema)

    def count(self, name: str, must: Must) -> int:
        with self._lock, self._existing(name):
            return self.client.count(name, count_filter=match_all(must), exact=True).count

    @contextlib.contextmanager
    def _existing(self, name: str) -> Iterator[None]:
        """MissingCollectionError when a call failed because `name` is gone (local mode raises
        ValueError, a server answers 404): asked of Qdrant, not read from its message."""
        try:
            yield
        except (ValueError, UnexpectedResponse) as error:
            if not self.client.collection_exists(name):
                raise MissingCollectionError(f"collection {name!r} does not exist") from error
            raise

    def delete(self, name: str, must: Must) -> None:
        selector = models.FilterSelector(filter=match_all(must))
        with self._lock:
            self.client.delete(name, points_selector=selector, wait=True)

    def retrieve(self, name: str, ids: list[str]) -> list[dict]:
        with self._lock:
            records = self.client.retrieve(name, ids, with_payload=True)
        return [record.payload or {} for record in records]

    def delete_ids(self, name: str, ids: list[str]) -> None:
        with self._lock, self._existing(name):
            self.client.delete(name, points_selector=models.PointIdsList(points=ids), wait=True)

    def page(self, name: str, must: Must, limit: int, offset: str | None) -> Page:
        with self._lock, self._existing(name):
            records, after = self.client.scroll(
                name, scroll_filter=match_all(must), limit=limit, offset=offset
            )
        return [record.payload or {} for record in records], None if after is None else str(after)

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
        index: IndexSettings | None = None,
    ) -> None:
        client = open_client(path, location, url, api_key, timeout, prefer_grpc)
        backend = QdrantBackend(client, local=url is None, index=index)
        try:
            super().__init__(backend, layout, prefix, batch_size)
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
    given = [
        name
        for name, value in (("path", path), ("location", location), ("url", url))
        if value is not None
    ]
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
