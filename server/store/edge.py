"""`EdgeStore`: the store over qdrant-edge-py, the Qdrant engine in-process.

Qdrant Edge gives one shard per directory and nothing above it: no collections, no aliases.
`EdgeBackend` adds those on disk under the data directory:

    {path}/.lock                  held while a process has the store open
    {path}/aliases.json           alias -> collection, replaced atomically (temp file, fsync,
                                  os.replace)
    {path}/collections/{name}/    one EdgeShard per collection (its WAL makes an upsert
                                  durable once it returns, even if the process dies)

Searches are exact (about 2 ms over 20k vectors of size 512) until `optimize()` builds HNSW
graphs over full segments (then under 1 ms). It is not run automatically: it holds the GIL, so
the whole server process stalls, for seconds (5 s for 20k clustered vectors of size 512 with
one indexing thread; 20-30 s for Gaussian noise, where HNSW recall also falls to about 0.35).
Run it off the request path. `benchmarks/store.py` measures all of this.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import qdrant_edge as qe

from server.store.base import Layout, StoreError
from server.store.core import Must, Store

_SCROLL_PAGE = 256
_DELETING = ".deleting"


def match_all(must: Must) -> qe.Filter | None:
    if not must:
        return None
    conditions = [
        qe.FieldCondition(key=key, match=qe.MatchValue(_value(v))) for key, v in must.items()
    ]
    return qe.Filter(must=conditions)


def _value(value: str | int | bool) -> str | int | np.bool_:
    # qdrant-edge-py 0.9.0 reads a Python bool as the integer 1 or 0, which never matches a
    # bool in a payload; numpy's bool is not an int, so it reaches the binding's bool case.
    return np.bool_(value) if isinstance(value, bool) else value


class EdgeBackend:
    """`Backend` over a directory of Qdrant Edge shards.

    Reads and writes of points run concurrently (the binding releases the GIL while it
    searches); a lock guards what this class keeps itself: the open shards and the aliases.
    """

    def __init__(
        self, path: str | PathLike, search_threads: int | None = None, index_threads: int = 0
    ) -> None:
        self.root = Path(path)
        self.search_threads = search_threads
        self.index_threads = index_threads
        (self.root / "collections").mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.root / ".lock", "a+")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise StoreError(f"{self.root} is open in another process") from None
        for leftover in (self.root / "collections").glob(f"*{_DELETING}"):
            shutil.rmtree(leftover)  # a drop interrupted after its rename
        self._lock = threading.RLock()
        self._shards: dict[str, qe.EdgeShard] = {}
        self._aliases: dict[str, str] = self._read_aliases()

    def _dir(self, name: str) -> Path:
        return self.root / "collections" / name

    def _shard(self, name: str) -> qe.EdgeShard:
        with self._lock:
            shard = self._shards.get(name)
            if shard is None:
                if not self._dir(name).is_dir():
                    raise StoreError(f"collection {name!r} does not exist")
                shard = self._shards[name] = qe.EdgeShard.load(str(self._dir(name)))
            return shard

    def collection_dim(self, name: str) -> int | None:
        config = self._dir(name) / "edge_config.json"  # written by EdgeShard.create
        if not config.is_file():
            return None
        vectors = json.loads(config.read_text())["vectors"]
        if set(vectors) != {""}:
            raise StoreError(f"collection {name!r} has named vectors: not made by this store")
        return int(vectors[""]["size"])

    def create_collection(
        self, name: str, dim: int, indexes: Sequence[tuple[str, bool]], tenant: bool
    ) -> None:
        # Tenant layout: no global graph, one per tenant value (as QdrantBackend asks a server).
        hnsw = qe.HnswIndexConfig(
            m=0 if tenant else 16,
            ef_construct=100,
            full_scan_threshold=10_000,  # KB, Qdrant's default
            max_indexing_threads=self.index_threads,
            payload_m=16 if tenant else None,
        )
        config = qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine),
            hnsw_config=hnsw,
            max_search_threads=self.search_threads,
        )
        with self._lock:
            shard = self._shards[name] = qe.EdgeShard.create(str(self._dir(name)), config)
        for field, is_tenant in indexes:
            index = qe.KeywordIndexParams(is_tenant=is_tenant or None)
            shard.update(qe.UpdateOperation.create_field_index(field, index))

    def drop_collection(self, name: str) -> None:
        with self._lock:
            shard = self._shards.pop(name, None)
            if shard is not None:
                shard.close()
            if self._dir(name).is_dir():
                doomed = self._dir(name).with_name(name + _DELETING)
                os.replace(self._dir(name), doomed)  # gone at once; the files go next
                shutil.rmtree(doomed)
            aliases = {a: c for a, c in self._aliases.items() if c != name}  # as Qdrant does
            if aliases != self._aliases:
                self._write_aliases(aliases)

    def upsert(self, name: str, ids: list[str], vectors: np.ndarray, payloads: list[dict]) -> None:
        points = [
            qe.Point(id, vector, payload)
            for id, vector, payload in zip(ids, vectors.tolist(), payloads, strict=True)
        ]
        self._shard(name).update(qe.UpdateOperation.upsert_points(points))

    def query(self, name: str, vector: np.ndarray, must: Must, limit: int) -> list[tuple]:
        request = qe.QueryRequest(
            limit=limit,
            query=qe.Query.Nearest(vector.tolist()),
            filter=match_all(must),
            with_payload=True,
        )
        return [(point.score, point.payload or {}) for point in self._shard(name).query(request)]

    def count(self, name: str, must: Must) -> int:
        return self._shard(name).count(qe.CountRequest(exact=True, filter=match_all(must)))

    def delete(self, name: str, must: Must) -> None:
        self._shard(name).update(qe.UpdateOperation.delete_points_by_filter(match_all(must)))

    def retrieve(self, name: str, ids: list[str]) -> list[dict]:
        records = self._shard(name).retrieve(ids, with_payload=True, with_vector=False)
        return [record.payload or {} for record in records]

    def scroll(self, name: str, must: Must) -> list[dict]:
        payloads, offset, shard = [], None, self._shard(name)
        while True:
            request = qe.ScrollRequest(
                offset=offset, limit=_SCROLL_PAGE, filter=match_all(must), with_payload=True
            )
            records, offset = shard.scroll(request)
            payloads += [record.payload or {} for record in records]
            if offset is None:
                return payloads

    def alias_target(self, alias: str) -> str | None:
        return self._aliases.get(alias)

    def set_alias(self, alias: str, target: str) -> None:
        with self._lock:
            if not self._dir(target).is_dir():
                raise StoreError(f"alias {alias!r}: collection {target!r} does not exist")
            self._write_aliases(self._aliases | {alias: target})

    def drop_alias(self, alias: str) -> None:
        with self._lock:
            if alias in self._aliases:
                self._write_aliases({a: c for a, c in self._aliases.items() if a != alias})

    def optimize(self) -> bool:
        """Build HNSW graphs where segments are full; True if anything changed. Blocking, and
        unlike searches it holds the GIL throughout."""
        with self._lock:
            return any([self._shard(name).optimize() for name in self._collections()])

    def close(self) -> None:
        with self._lock:
            for shard in self._shards.values():
                shard.close()  # flushes
            self._shards.clear()
            if not self._lock_file.closed:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                self._lock_file.close()

    def _collections(self) -> list[str]:
        return sorted(p.name for p in (self.root / "collections").iterdir() if p.is_dir())

    def _read_aliases(self) -> dict[str, str]:
        path = self.root / "aliases.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _write_aliases(self, aliases: dict[str, str]) -> None:
        """The switch is one os.replace; the fsyncs make it survive a power cut."""
        with tempfile.NamedTemporaryFile("w", dir=self.root, suffix=".tmp", delete=False) as f:
            json.dump(aliases, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(f.name, self.root / "aliases.json")
        directory = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self._aliases = aliases


class EdgeStore(Store):
    """The store over Qdrant Edge shards in the directory `path`.

    `search_threads`: each shard's search pool (None: one per CPU); `index_threads`: threads
    `optimize()` builds HNSW graphs with (0: automatic).
    """

    def __init__(
        self,
        path: str | PathLike,
        *,
        layout: Layout = "collection-per-task",
        prefix: str = "lpi",
        batch_size: int = 256,
        search_threads: int | None = None,
        index_threads: int = 0,
    ) -> None:
        backend = EdgeBackend(path, search_threads, index_threads)
        try:
            super().__init__(backend, layout, prefix, batch_size)
        except BaseException:
            backend.close()
            raise
        self._edge = backend

    def optimize(self) -> bool:
        """Build HNSW graphs (see the module docstring: blocks the process for seconds)."""
        with self._lock:
            return self._edge.optimize()
