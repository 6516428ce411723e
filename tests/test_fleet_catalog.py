"""The fleet's logic without Ray: artifact store, catalog, and replicas' registries in-process.

Two replicas' registries over one `CatalogBook` and one store follow each other's loads,
promotes and unloads within 2 s; a replica whose artifact store lacks a file or holds a corrupt
copy keeps that task behind (409 + Retry-After) and names it, while the other serves, and
catches up once the file is right; a catalog entry naming a file outside the store is refused;
with a working set, a replica loads a task when first asked (409 meanwhile) and lets the least
recently used go.
"""

from __future__ import annotations

import os
import random
import time

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.app import Assembly, build_service
from server.errors import install_error_handlers, refusal_of
from server.fleet import routes as fleet_routes
from server.fleet.artifacts import ArtifactStore, ArtifactStoreError
from server.fleet.catalog import CatalogBook
from server.fleet.link import BookLink
from server.fleet.registry import CatalogSyncError, FleetRegistry
from server.metrics import Metrics
from server.settings import Settings
from server.store import QdrantStore, StoreError, UnknownTaskError
from tests.fleet_helpers import CONVERGE_S, MIN_COSINE, wait_for, write_files
from tests.server_helpers import run
from wire import schema


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_files(tmp_path_factory.mktemp("fleet-files"))


# -- the parts --------------------------------------------------------------------------------


def test_artifact_store_refuses_uris_outside_it(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    source = tmp_path / "x.safetensors"
    source.write_bytes(os.urandom(64))
    uri = store.put(source)
    assert store.path(uri).read_bytes() == source.read_bytes()
    assert store.put(source) == uri  # content-addressed: once
    for bad in (
        "../x.safetensors",
        "/etc/passwd",
        "sha256/../../x.safetensors",
        "x",
        None,
        "sha256/" + "0" * 63 + ".safetensors",
    ):
        with pytest.raises(ArtifactStoreError):
            store.check_uri(bad)
    (tmp_path / "store" / uri).write_bytes(os.urandom(64))
    with pytest.raises(ArtifactStoreError, match="corrupt"):
        store.path(uri)


def test_catalog_book_persists_and_refuses(tmp_path, files):
    root, versions = files
    store = ArtifactStore(tmp_path)
    book = CatalogBook(store)
    uri = store.put(root / "a0.safetensors")
    generation = book.publish("t", versions[0], versions[0], {versions[0]: uri})
    with pytest.raises(ArtifactStoreError) as outside:
        book.publish("u", versions[1], None, {versions[1]: "../a1.safetensors"})
    assert outside.value.field == "artifact" and "u" not in book.live()
    with pytest.raises(ArtifactStoreError):
        book.publish("u", versions[1], versions[0], {versions[1]: uri})  # serving: no artifact
    again = CatalogBook(store)  # a restarted holder reads what was acknowledged
    assert again.generation == generation and again.live() == book.live()
    book.remove("t")
    assert CatalogBook(store).changes(generation) == {
        "t": {"deleted": True, "generation": generation + 1}
    }


# -- two replicas in one process --------------------------------------------------------------


class BookAssembly(Assembly):
    def __init__(self, link: BookLink, artifacts: ArtifactStore, store, working_set=None) -> None:
        self.link, self.artifacts, self.store = link, artifacts, store
        self.working_set = working_set

    def open_store(self, settings):
        return self.store

    def registry(self, settings, engine, store, backbone, metrics):
        return FleetRegistry(
            engine,
            store,
            settings.data_dir / "registry",
            backbone,
            metrics,
            link=self.link,
            artifacts=self.artifacts,
            reconcile_s=0.3,
            working_set=self.working_set,
        )


@pytest.fixture(params=[False])
def pair(request, tmp_path, files):
    """Replicas A and B: one catalog and store; B reads its own artifact folder, which the
    test fills (or corrupts) by `mirror`; or, with the param True, the shared one and B
    holds a working set of one task."""
    root, _ = files
    shared = ArtifactStore(tmp_path / "shared")
    link = BookLink(CatalogBook(shared))
    store = QdrantStore(location=":memory:")
    services = []
    small = request.param
    b_store = shared if small else ArtifactStore(tmp_path / "b-store")
    for name, artifacts in (("a", shared), ("b", b_store)):
        settings = Settings(
            backbone=str(root / "backbone.safetensors"),
            data_dir=tmp_path / name,
            artifact_dir=root,
            store="memory",
            threads=1,
        )
        working_set = 1 if small and name == "b" else None
        assembly = BookAssembly(link, artifacts, store, working_set)
        service, _, _ = build_service(settings, Metrics(), assembly=assembly)
        services.append(service)

    def mirror(corrupt: bool = False) -> None:
        for path in (tmp_path / "shared" / "sha256").glob("*.safetensors"):
            target = tmp_path / "b-store" / "sha256" / path.name
            target.write_bytes(os.urandom(64) if corrupt else path.read_bytes())

    try:
        yield services[0], services[1], mirror, link
    finally:
        for service in services:
            service.batcher.close()
            service.registry.close()
        store.close()


def embed(service, texts=("a red square", "stripes")):
    return run(service.embed("t", list(texts), []))


def test_replicas_follow_each_other(pair, files):
    a, b, mirror, _ = pair
    root, versions = files
    a.registry.load("t", root / "a0.safetensors", shown="a0")
    wait_for(lambda: "missing" in str(b.registry.failures()))  # not in B's folder: named, behind
    with pytest.raises(CatalogSyncError) as behind:
        embed(b)
    assert refusal_of(behind.value).status == 409 and behind.value.retry_after
    assert embed(a)["prompt_version"] == versions[0]  # the rest of the fleet serves
    mirror()
    wait_for(lambda: not b.registry.failures() and "t" in b.registry, timeout_s=3 * CONVERGE_S)
    mine, theirs = embed(a), embed(b)
    assert theirs["prompt_version"] == versions[0]
    cos = torch.nn.functional.cosine_similarity(
        torch.tensor(mine["text_embeddings"]), torch.tensor(theirs["text_embeddings"])
    )
    assert cos.min() >= MIN_COSINE

    # A load on B reaches A; a promote on A reaches B; an unload on B reaches A.
    a.registry.artifacts.put(root / "a1.safetensors")  # B publishes into its own folder
    b.registry.load("t", root / "a1.safetensors")
    wait_for(lambda: a.registry.info("t")["prompt_version"] == versions[1])
    assert a.registry.serving_version("t") == versions[0]
    a.registry.promote("t", versions[1], force=True)
    wait_for(lambda: b.registry.serving_version("t") == versions[1])
    b.registry.unload("t")
    wait_for(lambda: "t" not in a.registry)


def test_corrupt_copy_stays_behind_until_fixed(pair, files):
    a, b, mirror, link = pair
    root, versions = files
    a.registry.load("t", root / "a2.safetensors")
    mirror(corrupt=True)
    wait_for(lambda: "corrupt" in str(b.registry.failures()), timeout_s=3 * CONVERGE_S)
    assert embed(a)["prompt_version"] == versions[2]
    with pytest.raises(ArtifactStoreError):  # an entry naming a file outside the store: refused
        link.publish("t", versions[2], None, {versions[2]: "../a2.safetensors"})
    mirror()
    wait_for(lambda: not b.registry.failures(), timeout_s=3 * CONVERGE_S)
    assert embed(b)["prompt_version"] == versions[2]
    a.registry.load("u", root / "a0.safetensors")  # a task B never loaded (its file is not
    wait_for(lambda: "missing" in str(b.registry.failures()))  # in B's folder) ...
    assert b.registry.unload("u") == [versions[0]]  # ... can still be unloaded through B
    wait_for(lambda: "u" not in a.registry and not b.registry.failures())


@pytest.mark.parametrize("pair", [True], indirect=True)
def test_working_set_loads_cold_tasks_and_lets_the_oldest_go(pair, files):
    a, b, _, _ = pair
    root, versions = files
    a.registry.load("t", root / "a0.safetensors")
    a.registry.load("u", root / "a1.safetensors")
    time.sleep(0.5)  # B hears of both, holds neither
    assert "t" not in b.registry and "u" not in b.registry

    def served(task: str) -> dict | None:
        try:
            return run(b.embed(task, ["stripes"], []))
        except CatalogSyncError as err:  # 409 + Retry-After while it loads
            assert refusal_of(err).status == 409 and err.retry_after
            return None

    wait_for(lambda: served("t") is not None)
    assert served("t")["prompt_version"] == versions[0]
    wait_for(lambda: served("u") is not None)  # the working set holds one: t leaves
    assert served("u")["prompt_version"] == versions[1] and "t" not in b.registry
    a.registry.load("t", root / "a2.safetensors")  # replaced while cold on B
    wait_for(lambda: served("t") is not None)
    assert served("t")["prompt_version"] == versions[2]  # never the version it had before


@pytest.mark.parametrize("pair", [True], indirect=True)
def test_a_cold_task_unloaded_with_its_vectors_loses_them(pair, files):
    a, b, _, _ = pair
    root, versions = files
    a.registry.load("t", root / "a0.safetensors")
    items = [{"id": f"p{i}", "text": text} for i, text in enumerate(["a red square", "stripes"])]
    run(a.index(schema.IndexRequest(task="t", items=items)))
    assert b.store.count("t", versions[0]) == 2  # one store: B sees A's vectors
    wait_for(lambda: "t" in b.registry.catalog())
    assert "t" not in b.registry  # cold on B: it never held the task
    assert b.registry.info("t") == a.registry.info("t")  # GET /tasks/t: from the catalog
    assert [i["task"] for i in run(b.list_tasks())["tasks"]] == ["t"]  # GET /tasks
    assert "t" not in b.registry  # described, not loaded
    assert b.registry.unload("t", delete_vectors=True) == [versions[0]]
    with pytest.raises(UnknownTaskError):  # deleted through the store, not only unlisted
        b.store.count("t", versions[0])
    wait_for(lambda: "t" not in a.registry)


@pytest.mark.parametrize("pair", [True], indirect=True)
def test_a_cold_task_unload_fails_naming_the_store(pair, files, monkeypatch):
    a, b, _, link = pair
    root, _ = files
    a.registry.load("t", root / "a0.safetensors")
    wait_for(lambda: "t" in b.registry.catalog())
    before = {k: v for k, v in link.snapshot()[1]["t"].items() if k != "generation"}

    def down(task):
        raise StoreError("the vector store is unavailable: connection refused")

    monkeypatch.setattr(b.store, "delete_task", down)
    with pytest.raises(StoreError) as refused:
        b.registry.unload("t", delete_vectors=True)
    assert refusal_of(refused.value).status == 503
    # removed from the catalog before the delete (A stops taking writes), listed again after
    # it failed: the same entry, so every replica ends where it was and the unload can retry
    after = {k: v for k, v in link.snapshot()[1]["t"].items() if k != "generation"}
    assert after == before
    wait_for(lambda: "t" in b.registry.catalog() and "t" in a.registry)


@pytest.mark.parametrize("pair", [True], indirect=True)
def test_many_tasks_a_working_set_and_the_catalog_view(pair, files):
    """60 catalog tasks (their entries published as another replica would), B holding 1:
    B's `hold` (what Ray Serve's multiplexing calls before a routed request) loads each
    cold task with the catalog's version, never another; the catalog view lists them all."""
    a, b, _, link = pair
    root, versions = files
    uris = [a.registry.artifacts.put(root / f"a{i}.safetensors") for i in range(3)]
    expected = {}
    for n in range(60):
        i = n % 3
        link.publish(f"task-{n}", versions[i], None, {versions[i]: uris[i]})
        expected[f"task-{n}"] = versions[i]
    wait_for(lambda: len(b.registry.catalog()) == 60, timeout_s=3 * CONVERGE_S)
    assert not b.registry.hold("nope", 1.0)  # not in the catalog: nothing to load
    with pytest.raises(CatalogSyncError):  # an entry without its facts: loaded to describe it
        b.registry.info("task-1")
    assert not run(b.registry.hold_async("nope", 1.0))
    rng = random.Random(0)
    for n, task in enumerate(rng.sample(sorted(expected), 12)):
        if n == 0:  # the app's wait (async: no thread held) gives up; the load goes on
            run(b.registry.hold_async(task, 0.0))
            wait_for(lambda t=task: t in b.registry, timeout_s=30.0)  # a load, not the 2 s promise
        held = run(b.registry.hold_async(task, 30.0)) if n % 2 else b.registry.hold(task, 30.0)
        assert held
        assert run(b.embed(task, ["stripes"], []))["prompt_version"] == expected[task]
        assert len(b.registry) <= 1
    replaced = next(t for t in expected if expected[t] != versions[0] and t not in b.registry)
    link.publish(replaced, versions[0], None, {versions[0]: uris[0]})  # while cold on B
    wait_for(lambda: b.registry.catalog()[replaced]["active"] == versions[0])
    assert b.registry.hold(replaced, 30.0)
    assert run(b.embed(replaced, ["x"], []))["prompt_version"] == versions[0]

    app = FastAPI()
    app.state.service, app.state.settings = b, Settings.model_construct(api_key=None)
    install_error_handlers(app)
    app.include_router(fleet_routes.router)
    with TestClient(app) as http:
        listed = http.get("/fleet/tasks").json()["tasks"]
        assert len(listed) == 60 and sum(t["held_here"] for t in listed) == 1
        one = http.get(f"/fleet/tasks/{replaced}").json()
        assert one["active_version"] == versions[0] and one["held_here"]
        assert one["versions"] == {versions[0]: uris[0]}
        missing = http.get("/fleet/tasks/nope")
        assert missing.status_code == 404 and missing.json()["error"]["field"] == "task"


def test_remote_store_serves_every_store_method_the_server_calls():
    """In a fleet with the embedded store every replica's store is a `RemoteStore`: a method
    the server calls (or probes with getattr, which then finds nothing and skips the feature)
    that the store actor does not serve would be silently lost (made_by, payload indexes)."""
    import re
    from pathlib import Path

    from server.fleet.store_actor import METHODS, RemoteStore
    from server.store.task_versions import Store

    root = Path(__file__).resolve().parents[1] / "server"
    called = set()
    for path in root.rglob("*.py"):
        if path.parent.name == "store":  # the store's own internals
            continue
        text = path.read_text()
        called |= set(re.findall(r"store\.(\w+)\(", text))
        called |= set(re.findall(r"getattr\([\w.]*store, \"(\w+)\"", text))
    wanted = {name for name in called if callable(getattr(Store, name, None))}
    assert {"record_origin", "origins", "upsert", "search"} <= wanted  # the scan sees them
    remote = RemoteStore(actor=None)
    missing = sorted(n for n in wanted if n not in METHODS and n not in vars(RemoteStore))
    assert missing == []
    assert callable(remote.origins) and callable(remote.record_origin)
    with pytest.raises(AttributeError):
        remote.not_a_store_method  # noqa: B018
