"""Limits and security at the HTTP boundary: overload, timeouts, confinement, no unpickling."""

from __future__ import annotations

import asyncio
import pickle
import threading

import pytest

from tests.server_helpers import b64, create_app, run, running, settings

# `artifacts` (inbox, files): tests/app_fixtures.py.


def gate_the_model(app) -> threading.Event:
    """Hold every batch until the returned event is set (a model that is busy)."""
    gate = threading.Event()
    batcher = app.state.service.batcher
    encode = batcher._encode

    def held(modality, inputs, keys):
        gate.wait(30)
        return encode(modality, inputs, keys)

    batcher._encode = held
    return gate


def test_a_full_queue_answers_503_with_retry_after(tiny_runs, artifacts, tmp_path):
    inbox, _ = artifacts
    config = settings(
        tiny_runs,
        tmp_path / "d",
        inbox,
        max_queue_rows=2,
        max_items=2,
        max_batch_size=1,
        max_wait_ms=0,
    )
    app = create_app(config)

    async def scenario():
        async with running(app) as client:
            gate = gate_the_model(app)
            post = lambda: client.post("/embed", json={"texts": ["a", "b"]})  # noqa: E731
            first = asyncio.create_task(post())  # taken by the worker, held at the gate
            await asyncio.sleep(0.2)
            second = asyncio.create_task(post())  # fills the queue
            await asyncio.sleep(0.2)
            refused = await post()
            ready = await client.get("/readyz")
            gate.set()
            return refused, ready, await first, await second

    refused, ready, first, second = run(scenario())
    assert refused.status_code == 503
    assert refused.json()["error"]["type"] == "overloaded"
    assert int(refused.headers["retry-after"]) >= 1
    assert ready.status_code == 503 and "the queue is full" in ready.json()["reasons"]
    assert first.status_code == second.status_code == 200  # queued work still completes


def test_a_request_that_waits_too_long_times_out(tiny_runs, artifacts, tmp_path):
    inbox, _ = artifacts
    app = create_app(settings(tiny_runs, tmp_path / "d", inbox, request_timeout_s=0.3))

    async def scenario():
        async with running(app) as client:
            gate = gate_the_model(app)
            answer = await client.post("/embed", json={"texts": ["a"]})
            gate.set()
            after = await client.post("/embed", json={"texts": ["a"]})
            return answer, after

    answer, after = run(scenario())
    assert answer.status_code == 503 and answer.json()["error"]["type"] == "timeout"
    assert after.status_code == 200


def test_artifact_paths_cannot_leave_the_artifact_directory(tiny_runs, artifacts, tmp_path):
    inbox, files = artifacts
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(files["lpi"][0].read_bytes())
    (inbox / "escape.safetensors").unlink(missing_ok=True)
    (inbox / "escape.safetensors").symlink_to(outside)
    app = create_app(settings(tiny_runs, tmp_path / "d", inbox))

    async def scenario():
        async with running(app) as client:
            return [
                (await client.put("/tasks/t", json={"path": path})).json()["error"]
                for path in (
                    "escape.safetensors",
                    "../outside.safetensors",
                    str(outside),
                    "lpi/../../outside.safetensors",
                    "",
                )
            ]

    errors = run(scenario())
    assert [e["field"] for e in errors] == ["path"] * 5
    assert [e["type"] for e in errors] == ["invalid_path"] * 5


class Exploit:
    """Unpickling this would create `marker`: proof that something was unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_nothing_from_a_request_is_unpickled(tiny_runs, artifacts, tmp_path):
    import torch

    inbox, _ = artifacts
    marker = tmp_path / "unpickled"
    payloads = [pickle.dumps(Exploit(str(marker)))]
    torch_file = tmp_path / "model.pt"
    torch.save({"x": Exploit(str(marker))}, torch_file)
    payloads.append(torch_file.read_bytes())
    app = create_app(settings(tiny_runs, tmp_path / "d", inbox))

    async def scenario():
        async with running(app) as client:
            answers = []
            for payload in payloads:
                answers.append(
                    await client.put(
                        "/tasks/t",
                        content=payload,
                        headers={"content-type": "application/octet-stream"},
                    )
                )
                answers.append(await client.post("/embed", json={"images": [b64(payload)]}))
            return answers

    answers = run(scenario())
    assert [a.status_code for a in answers] == [422] * 4
    assert not marker.exists()


def test_urls_are_data_not_addresses(tiny_runs, artifacts, tmp_path):
    """An image given as a URL is refused as malformed base64; the server never fetches."""
    inbox, _ = artifacts
    app = create_app(settings(tiny_runs, tmp_path / "d", inbox))

    async def scenario():
        async with running(app) as client:
            return await client.post(
                "/embed", json={"images": ["http://169.254.169.254/latest/meta-data"]}
            )

    answer = run(scenario())
    assert answer.status_code == 422 and answer.json()["error"]["field"] == "images[0]"


def test_one_server_per_data_directory(tiny_runs, artifacts, tmp_path):
    inbox, _ = artifacts
    config = settings(tiny_runs, tmp_path / "d", inbox)

    async def scenario():
        async with running(create_app(config)):
            with pytest.raises(Exception, match="in use by another server"):
                async with running(create_app(config)):
                    pass

    run(scenario())
