"""`EdgeStore`: the store over qdrant-edge-py, the Qdrant engine in-process.

Qdrant Edge gives one shard per directory and nothing above it: no collections, no aliases.
`EdgeBackend` adds those on disk under the data directory:

    {path}/.lock                  held while a process has the store open
    {path}/aliases.json           alias -> collection, replaced atomically (temp file, fsync,
                                  os.replace)
    {path}/collections/{name}/    one EdgeShard per collection (its WAL makes an upsert
                                  durable once it returns, even if the process dies)
    {path}/collections/{name}.building/, .old/   a background build's copy (building.py)

Searches are exact (about 2 ms over 20k vectors of size 512) until a build makes HNSW graphs
over full segments (then about 1 ms). `optimize()` builds in this process and holds the GIL
throughout (the server stalls for minutes at 200k points); with `background_builds` the
store builds in a child process instead (`server.store.building`). HNSW, quantisation and
on-disk settings: `server.store.tuning`; `benchmarks/store.py` measures all of this.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import qdrant_edge as qe

from server.store import building
from server.store.building import BuildStatus, EdgeBuilder
from server.store.contract import Layout, MissingCollectionError, StoreError
from server.store.payloads import check_filter, filter_key
from server.store.task_versions import Must, Page, Store
from server.store.tuning import IndexSettings, SearchOptions

log = logging.getLogger("lpi.store")
_SCROLL_PAGE = 256
_DELETING = ".deleting"


FIELD_PARAMS = {
    "keyword": qe.KeywordIndexParams,
    "integer": qe.IntegerIndexParams,
    "bool": qe.BoolIndexParams,
}


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


def edge_config(
    index: IndexSettings, dim: int, tenant: bool, index_threads: int, search_threads: int | None
) -> qe.EdgeConfig:
    """A new shard's configuration. Tenant layout: no global graph, one per tenant value (as
    QdrantBackend asks a server)."""
    hnsw = qe.HnswIndexConfig(
        m=0 if tenant else index.m,
        ef_construct=index.ef_construct,
        full_scan_threshold=index.full_scan_kb(dim),
        max_indexing_threads=index_threads,
        payload_m=index.m if tenant else None,
    )
    quantization = None
    if index.quantization == "int8":
        quantization = qe.ScalarQuantizationConfig(
            type=qe.ScalarType.Int8, quantile=0.99, always_ram=True
        )
    vectors = qe.EdgeVectorParams(
        size=dim, distance=qe.Distance.Cosine, on_disk=index.on_disk or None
    )
    # Segments past exact_below points get a graph (Qdrant's default: about 5k of size 512).
    optimizers = qe.EdgeOptimizersConfig(indexing_threshold=index.full_scan_kb(dim))
    return qe.EdgeConfig(
        vectors=vectors,
        hnsw_config=hnsw,
        quantization_config=quantization,
        optimizers=optimizers,
        max_search_threads=search_threads,
    )


def search_params(index: IndexSettings, options: SearchOptions) -> qe.SearchParams:
    """Exact on request; else the request's or the collection's ef, rescoring int8 candidates
    on the original vectors."""
    quantization = None
    if index.quantization == "int8":
        quantization = qe.QuantizationSearchParams(
            ignore=not options.quantized, rescore=True, oversampling=index.oversampling
        )
    return qe.SearchParams(
        hnsw_ef=options.hnsw_ef or index.hnsw_ef, exact=options.exact, quantization=quantization
    )


class EdgeBackend:
    """`Backend` over a directory of Qdrant Edge shards.

    Reads and writes of points run concurrently (the binding releases the GIL while it
    searches); a lock guards what this class keeps itself: the open shards and the aliases.
    """

    def __init__(
        self,
        path: str | PathLike,
        search_threads: int | None = None,
        index_threads: int = 0,
        index: IndexSettings | None = None,
    ) -> None:
        self.root = Path(path)
        self.search_threads = search_threads
        self.index_threads = index_threads
        self.index = index or IndexSettings()
        (self.root / "collections").mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.root / ".lock", "a+")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise StoreError(f"{self.root} is open in another process") from None
        for leftover in (self.root / "collections").glob(f"*{_DELETING}"):
            shutil.rmtree(leftover)  # a drop interrupted after its rename
        self.interrupted_builds = building.repair(self.root / "collections")
        self._lock = threading.RLock()
        self._writes = threading.RLock()  # held by every write; a build's copy and catch-up
        self._journals: dict[str, list[tuple]] = {}  # collection -> writes since its copy
        self._retired: list[qe.EdgeShard] = []  # swapped out; closed at the next swap or close
        self._shards: dict[str, qe.EdgeShard] = {}
        self._aliases: dict[str, str] = self._read_aliases()

    def _dir(self, name: str) -> Path:
        return self.root / "collections" / name

    def _shard(self, name: str) -> qe.EdgeShard:
        with self._lock:
            shard = self._shards.get(name)
            if shard is None:
                if not self._dir(name).is_dir():
                    raise MissingCollectionError(f"collection {name!r} does not exist")
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
        config = edge_config(self.index, dim, tenant, self.index_threads, self.search_threads)
        with self._lock:
            shard = self._shards[name] = qe.EdgeShard.create(str(self._dir(name)), config)
        for field, is_tenant in indexes:
            index = qe.KeywordIndexParams(is_tenant=is_tenant or None)
            shard.update(qe.UpdateOperation.create_field_index(field, index))

    def drop_collection(self, name: str) -> None:
        # A build of this collection in flight must not swap its copy back in afterwards: with
        # its journal gone, `finish_build` fails and discards the copy.
        with self._writes:
            self._journals.pop(name, None)
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
        self._write(name, qe.UpdateOperation.upsert_points(points), ("upsert", list(ids)))

    def _write(self, name: str, operation: qe.UpdateOperation, entry: tuple) -> None:
        with self._writes:
            self._shard(name).update(operation)
            if name in self._journals:
                self._journals[name].append(entry)

    def query(
        self,
        name: str,
        vector: np.ndarray,
        must: Must,
        limit: int,
        options: SearchOptions | None = None,
    ) -> list[tuple]:
        request = qe.QueryRequest(
            limit=limit,
            query=qe.Query.Nearest(vector.tolist()),
            filter=match_all(must),
            with_payload=True,
            params=search_params(self.index, options or SearchOptions()),
        )
        return [(point.score, point.payload or {}) for point in self._shard(name).query(request)]

    def create_index(self, name: str, path: str, kind: str) -> None:
        operation = qe.UpdateOperation.create_field_index(path, FIELD_PARAMS[kind]())
        self._write(name, operation, ("index", path, FIELD_PARAMS[kind]()))

    def indexed_fields(self, name: str) -> set[str]:
        return set(self._shard(name).info().payload_schema)

    def count(self, name: str, must: Must) -> int:
        return self._shard(name).count(qe.CountRequest(exact=True, filter=match_all(must)))

    def delete(self, name: str, must: Must) -> None:
        operation = qe.UpdateOperation.delete_points_by_filter(match_all(must))
        self._write(name, operation, ("delete", match_all(must)))

    def retrieve(self, name: str, ids: list[str]) -> list[dict]:
        records = self._shard(name).retrieve(ids, with_payload=True, with_vector=False)
        return [record.payload or {} for record in records]

    def delete_ids(self, name: str, ids: list[str]) -> None:
        self._write(name, qe.UpdateOperation.delete_points(ids), ("delete_ids", list(ids)))

    def page(self, name: str, must: Must, limit: int, offset: str | None) -> Page:
        request = qe.ScrollRequest(
            offset=offset, limit=limit, filter=match_all(must), with_payload=True
        )
        records, after = self._shard(name).scroll(request)
        return [record.payload or {} for record in records], None if after is None else str(after)

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
            self._close_retired()
            if not self._lock_file.closed:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                self._lock_file.close()

    def _close_retired(self) -> None:
        """Shards swapped out by a build: their directory is gone and every write they took
        was replayed onto their successor, so a failing flush loses nothing."""
        for shard in self._retired:
            try:
                shard.close()
            except Exception:
                log.debug("closing a retired shard failed", exc_info=True)
        self._retired = []

    def _collections(self) -> list[str]:
        return sorted(
            p.name
            for p in (self.root / "collections").iterdir()
            if p.is_dir() and not p.name.endswith((building.BUILDING, building.OLD, _DELETING))
        )

    # -- background builds (server.store.building) ----------------------------------------------

    def build_dir(self, name: str) -> Path:
        return self._dir(name).with_name(name + building.BUILDING)

    def index_gaps(self) -> list[tuple[str, int, int]]:
        """(collection, points, points outside an HNSW graph) of every collection."""
        out = []
        for name in self._collections():
            info = self._shard(name).info()
            out.append((name, info.points_count, info.points_count - info.indexed_vectors_count))
        return out

    def begin_build(self, name: str) -> int:
        """Copy the flushed shard for a build and start journalling its writes; its points."""
        with self._writes:
            shard = self._shard(name)
            shard.flush()
            shutil.rmtree(self.build_dir(name), ignore_errors=True)
            shutil.copytree(self._dir(name), self.build_dir(name))
            self._journals[name] = []
            return shard.info().points_count

    def end_build(self, name: str) -> None:
        with self._writes:
            self._journals.pop(name, None)

    def finish_build(self, name: str, swapping) -> None:
        """Replay the journal onto the built copy and swap it in (writes paused meanwhile)."""
        with self._writes:
            built = qe.EdgeShard.load(str(self.build_dir(name)))
            try:
                building.replay(self._shard(name), built, self._journals[name])
                built.flush()
            finally:
                built.close()
            swapping()
            with self._lock:
                old = self._dir(name).with_name(name + building.OLD)
                os.replace(self._dir(name), old)
                os.replace(self.build_dir(name), self._dir(name))
                self._close_retired()
                self._retired = [self._shards.pop(name)]  # searches under way finish on it
                self._shards[name] = qe.EdgeShard.load(str(self._dir(name)))
            self._journals.pop(name)
            shutil.rmtree(old)  # its files stay readable through the retired shard's handles

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
    a build uses (0: automatic). `background_builds`: build HNSW graphs and payload indexes in
    a child process (`server.store.building`), queued by `build()`, by a filter on a field
    with no index, and (`auto_build`) whenever a collection's points outside its graph pass
    `max(exact_below, points / 20)`; `on_build` hears every change of a build's status.
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
        index: IndexSettings | None = None,
        background_builds: bool = False,
        auto_build: bool = True,
        on_build: Callable[[BuildStatus], None] | None = None,
    ) -> None:
        backend = EdgeBackend(path, search_threads, index_threads, index)
        try:
            super().__init__(backend, layout, prefix, batch_size)
        except BaseException:
            backend.close()
            raise
        self._edge = backend
        self.builder = None
        if background_builds:
            exact_below = backend.index.exact_below
            self.builder = EdgeBuilder(
                backend,
                lambda points: max(exact_below, points // 20),
                auto=auto_build,
                on_change=on_build,
            )

    def optimize(self) -> bool:
        """Build HNSW graphs in this process (blocks it, GIL included: benchmarks and tools;
        the server builds with `build()`)."""
        with self._lock:
            return self._edge.optimize()

    def build(self, task: str, version: str, fields: Sequence[tuple[str, str]] = ()) -> str:
        """Queue a background build of this version's collection; returns the collection."""
        if self.builder is None:
            raise StoreError("this store was opened without background_builds")
        name = self._require_entry(task, version)["collection"]
        self.builder.request(name, [(filter_key(f), kind) for f, kind in fields])
        return name

    def index_field(self, task: str, version: str, field: str, kind: str) -> None:
        """Small collections index at once; past `exact_below` points the index is built in
        the background (a scan meanwhile), so the call never stalls the process."""
        entry = self._require_entry(task, version)
        big = self._edge.count(entry["collection"], {}) > self._edge.index.exact_below
        if self.builder is None or not big:
            return super().index_field(task, version, field, kind)
        check_filter({field: "" if kind == "keyword" else 0})
        self.build(task, version, [(field, kind)])

    def builds(self) -> list[dict]:
        return [] if self.builder is None else self.builder.status()

    def close(self) -> None:
        if self.builder is not None:
            self.builder.close()
        super().close()
