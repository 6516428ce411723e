"""Races between requests in flight and task swaps, forced by holding or slowing the model.

Each test replays an interleaving a review found (the model is gated so the order is certain):
a request must never see a 500 because a version it pinned left the engine, a search never
compares vectors of two versions, and an unload racing a request never leaks a slot.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from tests.server_helpers import b64, create_app, export_artifacts, png_bytes, run, settings

TASK = "t"


@pytest.fixture(scope="module")
def artifacts(tiny_runs, tmp_path_factory):
    inbox = tmp_path_factory.mktemp("inbox")
    files = export_artifacts(tiny_runs, inbox)
    rel = lambda path: str(path.relative_to(inbox))  # noqa: E731
    return inbox, rel(files["lpi"][0]), rel(files["dense"][0])


class running_raw:
    """The app with its lifespan; 500s come back as responses (not raised) to be counted."""

    def __init__(self, app) -> None:
        self.app = app

    async def __aenter__(self) -> httpx.AsyncClient:
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()
        transport = httpx.ASGITransport(self.app, raise_app_exceptions=False)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://app", timeout=60)
        return self.client

    async def __aexit__(self, *exc) -> None:
        await self.client.aclose()
        await self.lifespan.__aexit__(*exc)


def gate_first_batch(app) -> tuple[threading.Event, list]:
    """The first batch blocks until the event is set; every batch's keys are recorded."""
    gate, calls = threading.Event(), []
    batcher = app.state.service.batcher
    encode = batcher._encode

    def gated(modality, inputs, keys):
        calls.append((modality, list(keys)))
        if len(calls) == 1:
            gate.wait(30)
        return encode(modality, inputs, keys)

    batcher._encode = gated
    return gate, calls


def test_rows_left_queued_by_a_refused_request_never_reach_the_model(
    tiny_runs, artifacts, tmp_path
):
    """The text leg is refused (queue full); its image leg is withdrawn before the swap
    removes the version it named, so the innocent request batched with it succeeds."""
    inbox, v1_path, v2_path = artifacts
    config = settings(
        tiny_runs, tmp_path / "d", inbox, max_queue_rows=4, max_items=4, max_wait_ms=0
    )
    app = create_app(config)

    async def scenario():
        async with running_raw(app) as client:
            await client.put(f"/tasks/{TASK}", json={"path": v1_path})
            gate, calls = gate_first_batch(app)
            busy = asyncio.create_task(client.post("/embed", json={"texts": ["busy"]}))
            await asyncio.sleep(0.2)
            fill = asyncio.create_task(client.post("/embed", json={"texts": ["q1", "q2"]}))
            await asyncio.sleep(0.1)
            refused = await client.post(
                "/embed",
                json={"task": TASK, "texts": ["a", "b", "c"], "images": [b64(png_bytes(1))]},
            )
            queued = app.state.service.batcher.queued_rows
            swap = await client.put(f"/tasks/{TASK}?promote=true", json={"path": v2_path})
            innocent = asyncio.create_task(
                client.post("/embed", json={"images": [b64(png_bytes(2))]})
            )
            await asyncio.sleep(0.1)
            gate.set()
            return refused, queued, swap, [await busy, await fill, await innocent], calls

    refused, queued, swap, answers, calls = run(scenario())
    assert refused.status_code == 503 and swap.status_code == 200
    assert queued == 2  # only the filler's rows: the refused request's image was withdrawn
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert all(key is None for _, keys in calls for key in keys)


def test_a_timed_out_request_keeps_its_version_until_its_batch_ends(tiny_runs, artifacts, tmp_path):
    inbox, v1_path, v2_path = artifacts
    app = create_app(settings(tiny_runs, tmp_path / "d", inbox, request_timeout_s=0.5))

    async def scenario():
        async with running_raw(app) as client:
            await client.put(f"/tasks/{TASK}", json={"path": v1_path})
            gate, _ = gate_first_batch(app)
            timed_out = await client.post("/embed", json={"task": TASK, "texts": ["a"]})
            swap = asyncio.create_task(
                client.put(f"/tasks/{TASK}?promote=true", json={"path": v2_path})
            )
            await asyncio.sleep(0.2)
            gate.set()
            after = await client.post("/embed", json={"task": TASK, "texts": ["a"]})
            return timed_out, await swap, after, app.state.service.engine.loaded()

    timed_out, swap, after, loaded = run(scenario())
    assert timed_out.status_code == 503 and timed_out.json()["error"]["type"] == "timeout"
    assert swap.status_code == 200 and after.status_code == 200
    assert loaded == [(TASK, swap.json()["task"]["prompt_version"])]  # v1 left after its batch


def test_a_search_never_compares_two_versions_when_a_promote_lands_midway(
    tiny_runs, artifacts, tmp_path
):
    inbox, v1_path, v2_path = artifacts
    app = create_app(settings(tiny_runs, tmp_path / "d", inbox))
    item = {"id": "a", "text": "a red square"}
    query = {"task": TASK, "query": {"text": "a red square"}, "top_k": 1}

    async def scenario():
        async with running_raw(app) as client:
            await client.put(f"/tasks/{TASK}", json={"path": v1_path})
            await client.post("/index", json={"task": TASK, "items": [item]})
            v2 = (await client.put(f"/tasks/{TASK}", json={"path": v2_path})).json()["task"]
            await client.post("/index", json={"task": TASK, "items": [item]})
            batcher = app.state.service.batcher
            encode = batcher._encode
            batcher._encode = lambda *a: (time.sleep(0.5), encode(*a))[1]
            search = asyncio.create_task(client.post("/search", json=query))
            await asyncio.sleep(0.2)
            promoted = await client.post(
                f"/tasks/{TASK}/promote", json={"version": v2["prompt_version"]}
            )
            return promoted, (await search).json()

    promoted, found = run(scenario())
    assert promoted.status_code == 200
    assert found["prompt_version"] == found["index_version"]
    assert found["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_an_unload_waits_for_the_request_holding_the_task(tiny_runs, artifacts, tmp_path):
    """New requests are refused (404) at once; the task leaves when the last pin goes; a
    reload afterwards serves, and nothing is left in the engine."""
    inbox, v1_path, v2_path = artifacts
    app = create_app(settings(tiny_runs, tmp_path / "d", inbox))

    async def scenario():
        async with running_raw(app) as client:
            registry, engine = app.state.service.registry, app.state.service.engine
            await client.put(f"/tasks/{TASK}", json={"path": v1_path})
            await client.put(f"/tasks/{TASK}", json={"path": v2_path})  # v1 serves, v2 active
            with registry.pin(TASK, "serving"):  # a search in flight on v1
                unload = asyncio.create_task(client.delete(f"/tasks/{TASK}"))
                await asyncio.sleep(0.3)
                waiting = not unload.done()
                refused = await client.post("/embed", json={"task": TASK, "texts": ["a"]})
                still = engine.loaded()
            unloaded = await unload
            gone = engine.loaded()
            back = await client.put(f"/tasks/{TASK}", json={"path": v1_path})
            return waiting, refused, still, unloaded, gone, back, engine.loaded()

    waiting, refused, still, unloaded, gone, back, loaded = run(scenario())
    assert waiting and len(still) == 2  # the unload waited; both versions stayed meanwhile
    assert refused.status_code == 404 and refused.json()["error"]["field"] == "task"
    assert "being unloaded" in refused.json()["error"]["message"]
    assert unloaded.status_code == 200 and len(unloaded.json()["unloaded_versions"]) == 2
    assert gone == []  # nothing leaked
    assert back.status_code == 200 and loaded == [(TASK, back.json()["task"]["prompt_version"])]


def test_an_unload_that_cannot_drain_changes_nothing(tiny_runs, artifacts, tmp_path):
    """A request still holding the task after the drain timeout: 409 task_busy, and the
    task serves on as before (registry.json unchanged)."""
    inbox, v1_path, _ = artifacts
    app = create_app(settings(tiny_runs, tmp_path / "d", inbox))
    state_file = tmp_path / "d" / "registry" / "registry.json"

    async def scenario():
        async with running_raw(app) as client:
            registry = app.state.service.registry
            registry.drain_timeout_s = 0.2
            await client.put(f"/tasks/{TASK}", json={"path": v1_path})
            before = json.loads(state_file.read_text())
            with registry.pin(TASK):
                busy = await client.delete(f"/tasks/{TASK}", params={"delete_vectors": "true"})
            after = await client.post("/embed", json={"task": TASK, "texts": ["a"]})
            return busy, after, before, json.loads(state_file.read_text())

    busy, after, before, saved = run(scenario())
    assert busy.status_code == 409, busy.text
    assert busy.json()["error"] == {
        "type": "task_busy",
        "field": "task",
        "message": busy.json()["error"]["message"],
    }
    assert after.status_code == 200 and saved == before


def test_a_transient_store_failure_at_restart_forgets_nothing(tiny_runs, artifacts, tmp_path):
    inbox, v1_path, _ = artifacts
    config = settings(tiny_runs, tmp_path / "d", inbox, store="local")
    state = tmp_path / "d" / "registry" / "registry.json"

    async def first():
        async with running_raw(create_app(config)) as client:
            await client.put(f"/tasks/{TASK}", json={"path": v1_path})

    async def flaky_restart():
        app = create_app(config)
        async with running_raw(app) as client:
            ready = (await client.get("/readyz")).json()
            return ready, app.state.service.engine.loaded(), json.loads(state.read_text())

    run(first())
    from server.store import Store, StoreError

    real = Store.ensure_task
    calls = {"n": 0}

    def fails_once(self, *args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise StoreError("store briefly unavailable")
        return real(self, *args)

    Store.ensure_task = fails_once
    try:
        ready, loaded, saved = run(flaky_restart())
    finally:
        Store.ensure_task = real
    assert ready["reasons"] and loaded == []  # reported, and the engine slot given back
    assert TASK in saved["tasks"]  # still named, so the next restart tries again

    async def healthy_restart():
        async with running_raw(create_app(config)) as client:
            return (await client.get(f"/tasks/{TASK}")).status_code

    assert run(healthy_restart()) == 200


def test_an_api_key_alone_also_guards_the_admin_routes(tiny_runs, artifacts, tmp_path):
    inbox, v1_path, _ = artifacts
    app = create_app(settings(tiny_runs, tmp_path / "d", inbox, api_key="q"))

    async def scenario():
        async with running_raw(app) as client:
            key = {"authorization": "Bearer q"}
            return [
                await client.put(f"/tasks/{TASK}", json={"path": v1_path}),
                await client.put(f"/tasks/{TASK}", json={"path": v1_path}, headers=key),
                await client.delete(f"/tasks/{TASK}"),
            ]

    assert [a.status_code for a in run(scenario())] == [401, 200, 401]


def test_chunked_bodies_and_multipart_over_their_limits_are_413(tiny_runs, artifacts, tmp_path):
    inbox, _, _ = artifacts
    app = create_app(settings(tiny_runs, tmp_path / "d", inbox, max_body_bytes=4096, max_items=4))

    async def chunks(data: bytes):
        for start in range(0, len(data), 1024):
            yield data[start : start + 1024]

    async def scenario():
        async with running_raw(app) as client:
            big = json.dumps({"task": TASK, "items": [{"text": "x" * 200}] * 40}).encode()
            chunked = await client.post(
                "/index", content=chunks(big), headers={"content-type": "application/json"}
            )
            files = [("images", (f"{i}.png", png_bytes(i, (2, 2)), "image/png")) for i in range(6)]
            form = await client.post("/embed", files=files)
            return chunked, form

    chunked, form = run(scenario())
    assert chunked.status_code == 413 and chunked.json()["error"]["field"] == "body"
    assert form.status_code == 413 and form.json()["error"]["type"] == "too_many_items"


def test_auto_is_not_a_task_name(tiny_runs, artifacts, tmp_path):
    inbox, v1_path, _ = artifacts

    async def scenario():
        async with running_raw(create_app(settings(tiny_runs, tmp_path / "d", inbox))) as c:
            return await c.put("/tasks/auto", json={"path": v1_path})

    answer = run(scenario())
    assert answer.status_code == 422 and answer.json()["error"]["field"] == "task"
