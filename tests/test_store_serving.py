"""The store's scale features through the HTTP API: precomputed vectors in /index, resumable
bulk runs, per-request exact/hnsw_ef, filter warnings, and a server that keeps answering while
an index builds (a real timing, with generous bounds for a loaded 2-core machine)."""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest

pytest.importorskip("qdrant_edge")

from tests.server_helpers import create_app, export_artifacts, run, running, settings

HEALTHZ_P99_S = 0.1  # the bound asked of the server while it builds
SEARCH_SLOWDOWN = 10  # a search during a build: within 10x its p99 before (or 250 ms)


@pytest.fixture(scope="module")
def artifacts(tiny_runs, tmp_path_factory):
    inbox = tmp_path_factory.mktemp("inbox")
    return inbox, export_artifacts(tiny_runs, inbox)


@pytest.fixture
def edge_app(tiny_runs, artifacts, tmp_path):
    inbox, files = artifacts

    def make(**extra):
        values = {"store": "edge", "exact_below": 500, "hnsw_m": 16, "hnsw_ef_construct": 64}
        return create_app(settings(tiny_runs, tmp_path / "data", inbox, **(values | extra)))

    return make, str(files["lpi"][0].relative_to(inbox))


async def loaded(client, path: str) -> tuple[str, int]:
    answer = await client.put("/tasks/t", json={"path": path})
    assert answer.status_code == 200, answer.text
    version = answer.json()["task"]["prompt_version"]
    embedded = await client.post("/embed", json={"task": "t", "texts": ["x"]})
    return version, len(embedded.json()["text_embeddings"][0])


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


async def index_vectors(client, version: str, rows: np.ndarray, start: int = 0, **extra):
    items = [
        {"id": str(start + i), "vector": row.tolist(), "payload": {"g": (start + i) % 3}}
        for i, row in enumerate(rows)
    ]
    body = {"task": "t", "prompt_version": version, "items": items, **extra}
    return await client.post("/index", json=body)


def test_precomputed_vectors_are_indexed_and_checked(edge_app):
    make, path = edge_app

    async def scenario():
        async with running(make()) as client:
            version, dim = await loaded(client, path)
            rows = unit_rows(300, dim, seed=1)
            answer = await index_vectors(client, version, rows)
            assert answer.status_code == 200 and len(answer.json()["ids"]) == 300, answer.text
            query = {"task": "t", "query": {"vector": rows[7].tolist()}, "top_k": 1}
            for extra in ({}, {"exact": True}, {"hnsw_ef": 8}):
                hit = (await client.post("/search", json=query | extra)).json()["hits"][0]
                assert hit["id"] == "7" and abs(hit["score"] - 1) < 1e-5  # float32 storage
            # resumable: stored ids are skipped, new ones written
            again = await index_vectors(client, version, unit_rows(310, dim, 2), skip_existing=True)
            assert again.status_code == 200, again.text
            assert sorted(again.json()["skipped"], key=int) == [str(i) for i in range(300)]
            assert again.json()["ids"] == [str(i) for i in range(300, 310)]
            hit = (await client.post("/search", json=query)).json()["hits"][0]
            assert hit["id"] == "7" and abs(hit["score"] - 1) < 1e-5  # not overwritten
            refusals = [
                (
                    await client.post(
                        "/index",
                        json={"task": "t", "items": [{"id": "a", "vector": rows[0].tolist()}]},
                    ),
                    422,
                    "prompt_version",
                ),
                (await index_vectors(client, "0" * 16, rows[:1]), 409, "prompt_version"),
                (await index_vectors(client, version, rows[:1, :-1]), 422, "items[0].vector"),
                (await index_vectors(client, version, 0 * rows[:1]), 422, "items[0].vector"),
                (await client.post("/search", json=query | {"hnsw_ef": 0}), 422, "hnsw_ef"),
                (await client.post("/search", json=query | {"exact": "maybe"}), 422, "exact"),
            ]
            for answer, status, field in refusals:
                assert answer.status_code == status, answer.text
                assert answer.json()["error"]["field"] == field, answer.text

    run(scenario())


def test_a_filter_with_no_index_past_the_threshold_warns(edge_app):
    make, path = edge_app

    async def scenario():
        async with running(make(warn_unindexed_above=100)) as client:
            version, dim = await loaded(client, path)
            rows = unit_rows(200, dim, seed=3)
            assert (await index_vectors(client, version, rows)).status_code == 200
            query = {"task": "t", "query": {"vector": rows[4].tolist()}, "filter": {"g": 1}}
            answer = (await client.post("/search", json=query)).json()
            assert answer["hits"][0]["id"] == "4" and "filter.g" in answer["warnings"][0]
            unfiltered = query | {"filter": None}
            assert (await client.post("/search", json=unfiltered)).json()["warnings"] == []

    run(scenario())


def test_the_server_answers_while_an_index_builds(edge_app, record_property):
    make, path = edge_app
    app = make(background_builds=True)

    async def timed(client, method, url, **kw) -> float:
        start = time.perf_counter()
        answer = await client.request(method, url, **kw)
        assert answer.status_code == 200, answer.text
        return time.perf_counter() - start

    async def scenario():
        async with running(app) as client:
            version, dim = await loaded(client, path)
            rows = unit_rows(8000, dim, seed=4)
            for lo in range(0, len(rows), 1000):
                answer = await index_vectors(client, version, rows[lo : lo + 1000], start=lo)
                assert answer.status_code == 200, answer.text
            search = {"task": "t", "query": {"vector": rows[9].tolist()}, "top_k": 5}
            before = [await timed(client, "POST", "/search", json=search) for _ in range(30)]
            store = app.state.service.store
            name = store.build("t", version)
            healthz, during, phases = [], [], set()
            while (phase := {s["collection"]: s for s in store.builds()}[name]["phase"]) not in (
                "done",
                "failed",
            ):
                phases.add(phase)
                healthz.append(await timed(client, "GET", "/healthz"))
                during.append(await timed(client, "POST", "/search", json=search))
                metrics = (await client.get("/metrics")).text
                assert f'lpi_store_build_phase{{collection="{name}",phase="{phase}"}}' in metrics
            assert phase == "done" and "indexing" in phases
            assert len(healthz) >= 10, len(healthz)  # the build lasted long enough to measure
            for label, values in (
                ("healthz", healthz),
                ("search_before", before),
                ("search_during", during),
            ):
                record_property(f"{label}_p99_ms", round(1e3 * np.percentile(values, 99), 1))
            record_property("samples_during_build", len(healthz))
            assert np.percentile(healthz, 99) < HEALTHZ_P99_S, sorted(healthz)[-3:]
            bound = max(SEARCH_SLOWDOWN * np.percentile(before, 99), 0.25)
            assert np.percentile(during, 99) < bound, (sorted(during)[-3:], bound)
            hit = (await client.post("/search", json=search)).json()["hits"][0]
            assert hit["id"] == "9"
            metrics = (await client.get("/metrics")).text
            # this build, and maybe an automatic one as the points arrived; none failed
            assert 'lpi_store_builds_total{outcome="done"}' in metrics, metrics[-600:]
            assert 'outcome="failed"' not in metrics

    run(scenario())


def test_the_cli_indexes_a_jsonl_of_vectors_and_resumes(edge_app, tmp_path, capsys):
    """`lpi index items.jsonl --prompt-version V --resume`: a second run after a partial one
    writes only the missing ids."""
    import json

    from anyio.from_thread import start_blocking_portal

    from clients.cli import main
    from tests.client_twins import PortalTransport

    make, path = edge_app
    app = make()
    with start_blocking_portal() as portal:  # noqa: SIM117 (the portal opens the lifespan)
        with portal.wrap_async_context_manager(app.router.lifespan_context(app)):
            transport = PortalTransport(app, portal)
            lpi = functools.partial(main, transport=transport)
            assert lpi(["tasks", "load", "t", "--server-path", path]) == 0
            capsys.readouterr()
            assert lpi(["-o", "json", "embed", "--task", "t", "--text", "x"]) == 0
            embedded = json.loads(capsys.readouterr().out)
            version, dim = embedded["prompt_version"], len(embedded["text_embeddings"][0])
            rows = unit_rows(50, dim, seed=5)
            lines = [
                json.dumps({"id": f"p{i}", "vector": row.tolist(), "payload": {"n": i}})
                for i, row in enumerate(rows)
            ]
            items = tmp_path / "items.jsonl"
            items.write_text("\n".join(lines[:20]) + "\n")
            argv = [
                "-o",
                "json",
                "index",
                "--task",
                "t",
                str(items),
                "--no-progress",
                "--prompt-version",
                version,
                "--resume",
                "--chunk-size",
                "16",
            ]
            assert lpi(argv) == 0
            assert json.loads(capsys.readouterr().out)["count"] == 20
            items.write_text("\n".join(lines) + "\n")  # the whole file, run again
            assert lpi(argv) == 0
            answer = json.loads(capsys.readouterr().out)
            assert (answer["count"], answer["skipped"]) == (30, 20)
            assert answer["ids"] == [f"p{i}" for i in range(20, 50)]
