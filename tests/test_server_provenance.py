"""What made the stored vectors, through the real app and the SDK twins: vectors indexed by the
float32 engine are recorded as `torch/float32`; after a restart in bfloat16 the record still
says float32, searches still find them (counted and logged as a dtype mismatch), and new
vectors add `torch/bfloat16` (and `external` for vectors sent with /index). Both persistent
stores (qdrant-client local mode and qdrant-edge) keep the record across the restart.

bfloat16 is forced through the engine's dtype resolution (`resolve_dtype`), so the second
server really computes in bfloat16 on any CPU (emulated where the CPU lacks it: slower, same
numbers); the test suite otherwise serves float32 (LPI_DTYPE=float32, tests/conftest.py).
"""

from __future__ import annotations

import logging
import re

import pytest
import torch

import server.engine
from lpi.precision import Precision
from server.app import create_app
from server.origins import CACHE_TTL_S, OriginWatch
from server.store import InvalidInputError, UnknownVersionError
from tests.app_fixtures import relative

TEXTS = ["a red square", "a blue circle", "a green triangle", "two yellow stars", "a grey cat"]
# bfloat16 keeps 8 bits of mantissa: per-row cosine to float32 >= 0.999 (tests/test_dtype.py),
# so a score moves by far less than 0.02 and the top hit of a query equal to an indexed text
# (score ~1, the next well below on these distinct captions) stays the same.
SCORE_TOLERANCE = 0.02


def mismatches(metrics: str) -> dict[tuple[str, str, str], float]:
    """(task, made_by, searched_with) -> count of lpi_search_dtype_mismatch_total."""
    found = {}
    for line in metrics.splitlines():
        if line.startswith("lpi_search_dtype_mismatch_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            key = (labels["task"], labels["made_by"], labels["searched_with"])
            found[key] = float(line.rsplit(" ", 1)[1])
    return found


@pytest.fixture(params=["local", "edge"])
def store(request):
    if request.param == "edge":
        pytest.importorskip("qdrant_edge")
    return request.param


def test_the_store_records_the_dtype_that_made_its_vectors(
    store, app_settings, artifacts, portal, connect, monkeypatch, caplog
):
    inbox, files = artifacts
    make = lambda: create_app(app_settings(store=store, dtype="float32"))  # noqa: E731

    app = make()
    with portal.wrap_async_context_manager(app.router.lifespan_context(app)):
        assert app.state.service.engine.dtype == "float32"
        client = connect(app=app)
        client.load_task("t", server_path=relative(files["lpi"][0], inbox))
        assert client.get_task("t").made_by == []  # no vectors yet
        client.index("t", [{"id": str(i), "text": text} for i, text in enumerate(TEXTS)])
        assert client.get_task("t").made_by == ["torch/float32"]
        assert [t.made_by for t in client.list_tasks().tasks] == [["torch/float32"]]
        before = client.search("t", text=TEXTS[3], top_k=2)
        assert mismatches(client.metrics()) == {}  # same dtype: nothing counted

    forced = Precision(torch.bfloat16, "bfloat16", "bfloat16 forced by the test")
    monkeypatch.setattr(server.engine, "resolve_dtype", lambda *args, **kwargs: forced)
    app = make()
    with portal.wrap_async_context_manager(app.router.lifespan_context(app)):
        engine = app.state.service.engine
        assert engine.dtype == "bfloat16"
        assert next(engine.backbone.parameters()).dtype == torch.bfloat16
        client = connect(app=app)
        assert client.get_task("t").made_by == ["torch/float32"]  # the record survived
        with caplog.at_level(logging.WARNING, logger="server.origins"):
            after = client.search("t", text=TEXTS[3], top_k=2)
            client.search("t", text=TEXTS[0], top_k=2)
        assert after.hits[0].id == before.hits[0].id == "3"
        assert abs(after.hits[0].score - before.hits[0].score) < SCORE_TOLERANCE
        counted = mismatches(client.metrics())
        assert counted == {("t", "torch/float32", "torch/bfloat16"): 2.0}
        warned = [r for r in caplog.records if r.name == "server.origins"]
        assert len(warned) == 1  # once per task version and makers, not per search
        assert warned[0].made_by == ["torch/float32"]
        assert warned[0].searched_with == "torch/bfloat16"
        assert warned[0].prompt_version == after.index_version

        # a query sent as a vector has no dtype: not counted
        vector = client.embed([TEXTS[1]], task="t").text_embeddings[0]
        assert client.search("t", vector=vector, top_k=1).hits[0].id == "1"
        assert sum(mismatches(client.metrics()).values()) == 2.0

        # more vectors of the same version, now in bfloat16, then sent by a caller
        client.index("t", [{"id": "5", "text": "a bfloat16 caption"}])
        assert client.get_task("t").made_by == ["torch/bfloat16", "torch/float32"]
        version = after.index_version
        sent = client.index_many(
            "t", [{"id": "6", "vector": vector}], prompt_version=version, progress=False
        )
        assert sent[0].ids == ["6"]
        assert client.get_task("t").made_by == ["external", "torch/bfloat16", "torch/float32"]
        assert client.search("t", text=TEXTS[3], top_k=1).hits[0].id == "3"


# -- the record in the store: one point per maker -------------------------------------------------

STORE_KINDS = ["local-memory", "local-tenant", "edge"]


@pytest.fixture(params=STORE_KINDS)
def vectors_store(request, tmp_path):
    """A store of each backend and layout; the `Store` class is shared, so is the record."""
    if request.param == "edge":
        pytest.importorskip("qdrant_edge")
        from server.store import EdgeStore

        opened = EdgeStore(tmp_path / "edge", search_threads=1, index_threads=1)
    else:
        from server.store import QdrantStore

        layout = "tenant" if request.param == "local-tenant" else "collection-per-task"
        opened = QdrantStore(location=":memory:", layout=layout)
    yield opened
    opened.close()


def second_process(store):
    """Another server's view of the same store: its own `Store` (and lock) on the backend."""
    from server.store.task_versions import Store

    return Store(store._backend, layout=store.layout, prefix=store.prefix)


def origin_points(store) -> list[dict]:
    from server.store.provenance import ORIGIN_KIND

    return store._backend.scroll(store._catalog, {"kind": ORIGIN_KIND})


def test_makers_are_points_of_their_own_and_leave_with_their_version(vectors_store):
    from server.store.contract import catalog_id

    store, other = vectors_store, second_process(vectors_store)
    for version in ("v1", "v2"):
        store.ensure_task("t", 4, version)
    entry = store._entry("t", "v1")
    store.record_origin("t", "v1", "torch/float32")
    other.record_origin("t", "v1", "torch/bfloat16")  # another process, another maker
    store.record_origin("t", "v1", "torch/float32")  # again: one point still
    assert (
        store.origins("t", "v1")
        == other.origins("t", "v1")
        == [
            "torch/bfloat16",
            "torch/float32",
        ]
    )
    assert store.origins("t", "v2") == []
    # the version's entry is never rewritten, so no write can undo another's
    assert store._backend.retrieve(store._catalog, [catalog_id("version", "t", "v1")]) == [entry]
    assert len(origin_points(store)) == 2

    store.promote("t", "v2")
    other.delete_version("t", "v1")
    assert origin_points(store) == []
    with pytest.raises(UnknownVersionError):
        store.origins("t", "v1")
    store.ensure_task("t", 4, "v1")  # made again: it starts with no makers
    assert store.origins("t", "v1") == []
    store.record_origin("t", "v2", "onnx/int8")
    store.delete_task("t")
    assert origin_points(store) == []


def test_a_record_racing_the_delete_of_its_version_leaves_no_maker(vectors_store):
    """The delete runs between the maker's write and the check after it (as another process
    would): the record fails as for an unknown version and takes its point back."""
    from server.store.provenance import ORIGIN_KIND

    store, other = vectors_store, second_process(vectors_store)
    for version in ("v1", "v2"):
        store.ensure_task("t", 4, version)
    store.promote("t", "v2")
    backend, write = store._backend, store._backend.upsert

    def upsert_then_delete(name, ids, vectors, payloads):
        write(name, ids, vectors, payloads)
        if payloads[0].get("kind") == ORIGIN_KIND:
            other.delete_version("t", "v1")

    backend.upsert = upsert_then_delete
    try:
        with pytest.raises(UnknownVersionError):
            store.record_origin("t", "v1", "torch/float32")
    finally:
        del backend.upsert
    assert origin_points(store) == []
    assert store.versions("t") == ["v2"]  # nothing brought v1 back
    with pytest.raises(UnknownVersionError):
        store.record_origin("t", "v9", "torch/float32")  # never made: no point left either
    with pytest.raises(InvalidInputError):
        store.record_origin("t", "v2", "")
    assert origin_points(store) == []


# -- the cache of makers in the server -----------------------------------------------------------


class CountingStore:
    """The record's two calls, counted; `made` is what the store holds."""

    def __init__(self, made=()):
        self.made = set(made)
        self.reads = self.writes = 0

    def record_origin(self, task, version, maker):
        self.writes += 1
        self.made.add(maker)

    def origins(self, task, version):
        self.reads += 1
        if version == "gone":
            raise UnknownVersionError("gone", "version")
        return sorted(self.made)


class Counter:
    def __init__(self):
        self.counts = {}

    def labels(self, *labels):
        self.key = labels
        return self

    def inc(self):
        self.counts[self.key] = self.counts.get(self.key, 0) + 1


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def watch(store, dtype="bfloat16", clock=None):
    from types import SimpleNamespace

    engine = SimpleNamespace(name="torch", dtype=dtype)
    metrics = SimpleNamespace(dtype_mismatch=Counter())
    return OriginWatch(engine, store, metrics, clock=clock or Clock())


def test_searches_read_the_makers_once_and_count_every_mismatch(caplog):
    store = CountingStore({"torch/float32", "external"})
    origins = watch(store)
    with caplog.at_level(logging.WARNING, logger="server.origins"):
        for _ in range(3):
            assert origins.searched("t", "v1", query=None) == ["torch/float32"]
    assert store.reads == 1
    assert origins.metrics.dtype_mismatch.counts == {("t", "torch/float32", "torch/bfloat16"): 3}
    assert len([r for r in caplog.records if r.name == "server.origins"]) == 1
    vector_query = type("Query", (), {"vector": [0.1, 0.2]})()
    assert origins.searched("t", "v1", query=vector_query) == []  # no dtype to compare
    assert store.reads == 1
    assert origins.searched("t", "gone") == [] and store.reads == 2  # vanished: nothing cached
    assert origins.searched("t", "gone") == [] and store.reads == 3


def test_an_index_writes_only_makers_not_known_and_an_unload_forgets():
    store = CountingStore()
    clock = Clock()
    origins = watch(store, dtype="float32", clock=clock)
    origins.record("t", "v1", modelled=True, given=False)  # nothing known: written, then read
    assert (store.writes, store.reads) == (1, 1)
    origins.record("t", "v1", modelled=True, given=False)  # now known: no round trip
    assert (store.writes, store.reads) == (1, 1)
    assert origins.searched("t", "v1") == [] and store.reads == 1
    origins.record("t", "v1", modelled=True, given=True)  # only `external` is new
    assert store.writes == 2 and store.made == {"torch/float32", "external"}
    origins.record("t", "v1", modelled=True, given=True)
    assert store.writes == 2
    assert origins.searched("t", "v1") == [] and store.reads == 1

    store.made = {"torch/bfloat16"}  # another process deleted v1, made it again, indexed it
    assert origins.searched("t", "v1") == []  # the cache is trusted ...
    clock.now += CACHE_TTL_S + 1  # ... for a while
    assert origins.searched("t", "v1") == ["torch/bfloat16"] and store.reads == 2
    origins.forget("t")  # this process's unload
    assert origins.searched("t", "v1") == ["torch/bfloat16"] and store.reads == 3
    origins.record("t", "v1", modelled=True, given=False)
    assert store.writes == 3  # float32 was forgotten with the old version

    origins.record("t", "gone", modelled=True, given=False)  # the read fails: nothing cached
    origins.record("t", "gone", modelled=True, given=False)
    assert (store.writes, store.reads) == (5, 5)


def test_the_search_path_does_not_leave_the_event_loop_when_the_makers_are_known(monkeypatch):
    import asyncio

    import server.origins

    store = CountingStore({"torch/float32"})
    origins = watch(store)
    hops = []

    async def counted_hop(fn, *args):
        hops.append(fn)
        return fn(*args)

    monkeypatch.setattr(server.origins, "run_in_threadpool", counted_hop)
    for _ in range(3):
        assert asyncio.run(origins.after_search("t", "v1")) == ["torch/float32"]
    assert len(hops) == 1 and store.reads == 1


# -- a key check passed for one app is no pass for another ---------------------------------------


def test_a_key_check_noted_for_another_app_is_no_pass():
    """The scope (shared with a mounted sub-app) notes which app's keys a request passed; a note
    for another app leaves this app's check, key-first and as the route's dependency, to run."""
    import asyncio
    from types import SimpleNamespace

    import httpx
    from fastapi import APIRouter, Depends, FastAPI
    from pydantic import SecretStr

    from server.errors import install_error_handlers
    from server.routes import deps

    app = FastAPI()
    install_error_handlers(app)
    app.state.settings = SimpleNamespace(api_key=SecretStr("key"), admin_key=None)
    checked = [Depends(deps.require_api_key)]
    first = APIRouter(route_class=deps.KeyFirstRoute)
    first.add_api_route("/first", lambda: {"ok": True}, dependencies=checked)
    app.include_router(first)
    app.add_api_route("/declared", lambda: {"ok": True}, dependencies=checked)

    def noting(app_id):
        async def outer(scope, receive, send):
            if scope["type"] == "http":
                scope[deps.CHECKED] = {(deps.require_api_key, app_id)}
            await app(scope, receive, send)

        return outer

    async def status(asgi, path):
        transport = httpx.ASGITransport(asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return (await client.get(path)).status_code

    for path in ("/first", "/declared"):
        assert asyncio.run(status(noting(id(object())), path)) == 401, path
        assert asyncio.run(status(app, path)) == 401, path
        assert asyncio.run(status(noting(id(app)), path)) == 200, path  # its own app's note
