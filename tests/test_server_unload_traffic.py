"""Unload and reload under traffic: clients index, search and embed a task while another
deletes it (with and without its vectors) and loads it back. Every answer is a 2xx, a 404
(the task is not loaded) or a 409 (its version is not loaded or not indexed), never a 5xx.

In-process app with concurrent clients on its ASGI transport, until the churn has made
`CYCLES` unload/reload cycles (bounded by `MAX_SECONDS`): counting cycles, not seconds, keeps
the test meaningful on a loaded machine, where a few seconds may hold a single cycle.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import pytest

from tests.server_helpers import create_app, export_artifacts, run, settings

TASK = "t"
CYCLES = 4  # unload + reload cycles that must cross the traffic
ROUTES = ("/index", "/search", "/embed")
MAX_SECONDS = 60.0  # an upper bound only; an idle 2-core machine makes ~6 cycles a second


@pytest.fixture(scope="module")
def artifacts(tiny_runs, tmp_path_factory):
    inbox = tmp_path_factory.mktemp("inbox")
    files = export_artifacts(tiny_runs, inbox)
    return inbox, str(files["lpi"][0].relative_to(inbox))


async def _hammer(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    body: dict,
    done: asyncio.Event,
    answers: Counter,
    errors: list,
) -> None:
    while not done.is_set():
        response = await client.request(method, url, json=body)
        answers[(url, response.status_code)] += 1
        if response.status_code >= 500 or response.status_code not in (200, 404, 409):
            errors.append((url, response.status_code, response.text[:300]))
        elif response.status_code >= 400:
            assert response.json()["error"]["field"], response.text
        # A client pausing 1 ms between answers: a loop of instant 404s with no pause would
        # take the whole event loop, which no set of real clients on sockets does.
        await asyncio.sleep(0.001)


async def _churn(client, path: str, delete_vectors: bool, done: asyncio.Event, answers, errors):
    query = {"delete_vectors": "true"} if delete_vectors else {}
    until = time.monotonic() + MAX_SECONDS
    cycles = 0
    while cycles < CYCLES and time.monotonic() < until:
        cycles += 1
        for response in (
            await client.delete(f"/tasks/{TASK}", params=query),
            await client.put(f"/tasks/{TASK}", json={"path": path}),
        ):
            answers[("admin", response.status_code)] += 1
            if response.status_code not in (200, 404):
                errors.append(("admin", response.status_code, response.text[:300]))
        await asyncio.sleep(0.01)
    served_by = time.monotonic() + 15.0  # the reloaded task serves every route at least once
    while time.monotonic() < served_by and any(answers[(u, 200)] == 0 for u in ROUTES):
        await asyncio.sleep(0.05)
    done.set()


@pytest.mark.parametrize("delete_vectors", [False, True])
def test_unloading_under_traffic_answers_no_5xx(tiny_runs, artifacts, tmp_path, delete_vectors):
    inbox, path = artifacts
    app = create_app(settings(tiny_runs, tmp_path / "d", inbox, max_wait_ms=1.0))

    async def scenario():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app, raise_app_exceptions=False)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://app", timeout=60
            ) as client:
                assert (await client.put(f"/tasks/{TASK}", json={"path": path})).status_code == 200
                answers, errors = Counter(), []
                done = asyncio.Event()
                item = {"id": "a", "text": "a photo", "payload": {"n": 1}}
                bodies = {
                    "/index": {"task": TASK, "items": [item]},
                    "/search": {"task": TASK, "query": {"text": "a"}},
                    "/embed": {"task": TASK, "texts": ["a"]},
                }
                await asyncio.gather(
                    *(
                        _hammer(client, "POST", url, bodies[url], done, answers, errors)
                        for url in ROUTES
                    ),
                    _churn(client, path, delete_vectors, done, answers, errors),
                )
                return answers, errors

    answers, errors = run(scenario())
    assert not errors, (errors[:5], answers)
    churned = answers[("admin", 200)]
    assert churned >= 2 * CYCLES, answers  # every unload and reload crossed the traffic
    for url in ROUTES:
        assert answers[(url, 200)] > 0, answers
