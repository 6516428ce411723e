"""The batching path over a real loopback socket: `python -m server`, concurrent clients, swaps.

At least 200 requests across 8 tasks from 32 concurrent clients while every task's prompt is
swapped back and forth (each round of swaps waits until traffic has seen it, so every version
is served whatever the machine's speed); every answer must succeed and carry vectors that the
prompt version it names computes (cosine >= 0.9999 against the direct model call for it).
"""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

import lpi
from export import read_artifact
from server.testing import ServerProcess
from tests.server_helpers import (
    b64,
    cosines,
    export_artifacts,
    png_bytes,
    reference_features,
)

REQUESTS, TASKS, CLIENTS, MIN_COSINE = 200, 8, 32, 0.9999


@pytest.fixture(scope="module")
def setup(tiny_runs, tmp_path_factory):
    inbox = tmp_path_factory.mktemp("inbox")
    files = export_artifacts(tiny_runs, inbox)
    backbone = lpi.load_backbone(tiny_runs / "backbone.safetensors")
    return inbox, files, backbone


def test_concurrent_mixed_task_requests_with_swaps(tiny_runs, setup, tmp_path):
    inbox, files, backbone = setup
    texts, image = ["a red square", "a small blue circle"], png_bytes(7)
    reference = {}
    for path in files["lpi"] + files["dense"]:
        want = reference_features(backbone, path, texts, [image])
        reference[read_artifact(path).prompt_version] = want
    args = [
        "--backbone",
        str(tiny_runs / "backbone.safetensors"),
        "--data-dir",
        str(tmp_path / "data"),
        "--artifact-dir",
        str(inbox),
        "--store",
        "memory",
        "--max-batch-size",
        "32",
        "--max-wait-ms",
        "5",
        "--log-level",
        "warning",
    ]
    tasks = [f"task{i}" for i in range(TASKS)]
    relative = lambda p: str(p.relative_to(inbox))  # noqa: E731

    async def scenario(url):
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
            for i, task in enumerate(tasks):
                r = await client.put(f"/tasks/{task}", json={"path": relative(files["lpi"][i % 2])})
                assert r.status_code == 200, r.text

            answered = 0  # answers so far: each round of swaps waits for traffic to see it
            swapping = asyncio.Event()

            async def swapper():
                swaps = []
                for n in range(4):
                    for i, task in enumerate(tasks):
                        method = ("dense", "lpi")[n % 2]
                        body = {"path": relative(files[method][i % 2])}
                        swaps.append((await client.put(f"/tasks/{task}", json=body)).status_code)
                        await asyncio.sleep(0.005)
                    mark = answered  # more answers than clients: some were asked after the round
                    while answered < mark + 2 * CLIENTS:
                        await asyncio.sleep(0.005)
                swapping.set()
                return swaps

            async def client_loop(first):
                nonlocal answered
                answers, n = [], first
                while n < REQUESTS or not swapping.is_set():
                    body = {"task": tasks[n % TASKS]}
                    body |= {"texts": texts} if n % 3 else {"images": [b64(image)]}
                    answers.append((n, await client.post("/embed", json=body)))
                    answered += 1
                    n += CLIENTS
                return answers

            swaps, *per_client = await asyncio.gather(
                swapper(), *(client_loop(first) for first in range(CLIENTS))
            )
            answers = [answer for client_answers in per_client for answer in client_answers]
            metrics = (await client.get("/metrics")).text
            return swaps, answers, metrics

    with ServerProcess(args, log_path=tmp_path / "server.log") as server:
        swaps, answers, metrics = asyncio.run(scenario(server.url))

    assert swaps == [200] * len(swaps)
    assert len(answers) >= REQUESTS and {a.status_code for _, a in answers} == {200}
    seen = set()
    for n, answer in answers:
        body = answer.json()
        seen.add(body["prompt_version"])
        want = reference[body["prompt_version"]]
        if n % 3:
            assert cosines(body["text_embeddings"], want["text"]).min() >= MIN_COSINE
        else:
            assert cosines(body["image_embeddings"], want["image"]).min() >= MIN_COSINE
    assert len(seen) == 4  # both versions of both source tasks served
    # Batching happened: batches held several rows and several tasks on average.
    assert _mean(metrics, "lpi_batch_rows", "text") > 2
    assert _mean(metrics, "lpi_batch_tasks", "text") > 1


def _mean(metrics: str, name: str, modality: str) -> float:
    total = float(re.search(rf'{name}_sum{{modality="{modality}"}} (\S+)', metrics).group(1))
    count = float(re.search(rf'{name}_count{{modality="{modality}"}} (\S+)', metrics).group(1))
    return total / count
