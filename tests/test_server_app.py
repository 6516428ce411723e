"""The real app in-process (httpx ASGI transport): the routes against the model, swaps, errors.

Embeddings are compared per vector with the direct model call (cosine >= 0.9999: the server
runs the same fp32 math through the slot pool, so only summation order may differ).
"""

from __future__ import annotations

import asyncio
import io

import pytest
import torch
from PIL import Image

import lpi
from tests.app_fixtures import load
from tests.server_helpers import (
    b64,
    cosines,
    create_app,
    png_bytes,
    reference_features,
    run,
    running,
)

MIN_COSINE = 0.9999


def test_embed_equals_the_direct_model_call(app_settings, artifacts, backbone):
    inbox, files = artifacts
    artifact = files["lpi"][0]
    texts, images = ["a red square", "two blue circles on grey"], [png_bytes(1), png_bytes(2)]

    async def scenario():
        async with running(create_app(app_settings())) as client:
            await load(client, "animals", artifact, inbox)
            prompted = await client.post(
                "/embed",
                json={"task": "animals", "texts": texts, "images": [b64(i) for i in images]},
            )
            bare = await client.post("/embed", json={"texts": texts})
            return prompted.json(), bare.json()

    prompted, bare = run(scenario())
    want = reference_features(backbone, artifact, texts, images)
    assert cosines(prompted["text_embeddings"], want["text"]).min() >= MIN_COSINE
    assert cosines(prompted["image_embeddings"], want["image"]).min() >= MIN_COSINE
    plain = reference_features(backbone, None, texts)
    assert cosines(bare["text_embeddings"], plain["text"]).min() >= MIN_COSINE
    assert bare["prompt_version"] is None and bare["image_embeddings"] is None
    assert prompted["prompt_version"] == prompted["prompt_versions"]["animals"]
    assert prompted["backbone"] == lpi.fingerprint(backbone)
    # The prompt changes the vectors: the comparison above is not trivially true.
    assert cosines(prompted["text_embeddings"], plain["text"]).min() < 0.999


def test_multipart_embed_equals_json(app_settings, artifacts):
    inbox, files = artifacts
    image = png_bytes(3)

    async def scenario():
        async with running(create_app(app_settings())) as client:
            await load(client, "shapes", files["lpi"][0], inbox)
            as_json = await client.post(
                "/embed", json={"task": "shapes", "texts": ["a dot"], "images": [b64(image)]}
            )
            as_form = await client.post(
                "/embed",
                data={"task": "shapes", "texts": ["a dot"]},
                files=[("images", ("a.png", image, "image/png"))],
            )
            return as_json.json(), as_form.json()

    as_json, as_form = run(scenario())
    assert as_form["prompt_version"] == as_json["prompt_version"]
    assert cosines(as_form["image_embeddings"], as_json["image_embeddings"]).min() >= MIN_COSINE
    assert cosines(as_form["text_embeddings"], as_json["text_embeddings"]).min() >= MIN_COSINE


def test_search_finds_the_indexed_item_first(app_settings, artifacts):
    inbox, files = artifacts
    captions = ["a red square", "a blue circle", "a green triangle", "a yellow star"]
    images = [png_bytes(10 + i) for i in range(4)]

    async def scenario():
        async with running(create_app(app_settings())) as client:
            await load(client, "shapes", files["lpi"][0], inbox)
            items = [
                {"id": f"t{i}", "text": c, "payload": {"kind": "text", "n": i}}
                for i, c in enumerate(captions)
            ]
            items += [
                {"id": f"i{i}", "image": b64(b), "payload": {"kind": "image"}}
                for i, b in enumerate(images)
            ]
            indexed = await client.post("/index", json={"task": "shapes", "items": items})
            assert indexed.status_code == 200, indexed.text
            found = []
            for i, caption in enumerate(captions):
                r = await client.post(
                    "/search",
                    json={
                        "task": "shapes",
                        "query": {"text": caption},
                        "top_k": 3,
                        "filter": {"kind": "text"},
                    },
                )
                found.append((f"t{i}", r.json()))
            r = await client.post(
                "/search", json={"task": "shapes", "query": {"image": b64(images[2])}, "top_k": 1}
            )
            found.append(("i2", r.json()))
            vector = await client.post("/embed", json={"task": "shapes", "texts": [captions[1]]})
            r = await client.post(
                "/search",
                json={
                    "task": "shapes",
                    "query": {"vector": vector.json()["text_embeddings"][0]},
                },
            )
            found.append(("t1", r.json()))
            return indexed.json(), found

    indexed, found = run(scenario())
    assert indexed["ids"] == [f"t{i}" for i in range(4)] + [f"i{i}" for i in range(4)]
    assert indexed["serving"] is True
    for want, result in found:
        assert result["hits"][0]["id"] == want, result
        assert result["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert result["prompt_version"] == result["index_version"]
    assert all(h["payload"]["kind"] == "text" for h in found[0][1]["hits"])


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"task": "t", "images": ["@@not base64@@"]}, 422, "images[0]"),
        ({"task": "t", "images": [b64(b"hello, not an image")]}, 422, "images[0]"),
        ({"task": "t"}, 422, "texts"),
        ({"task": "t", "texts": []}, 422, "texts"),
        ({"task": "t", "texts": ["x"] * 9}, 413, "texts"),
        ({"task": "T!", "texts": ["x"]}, 422, "task"),
        ({"task": "nope", "texts": ["x"]}, 404, "task"),
        ({"task": "t", "texts": ["y" * 101]}, 413, "texts[0]"),
        ({"task": "t", "texts": ["x"], "colour": "red"}, 422, "colour"),
    ],
)
def test_bad_embed_requests_name_the_field(app_settings, artifacts, body, status, field):
    inbox, files = artifacts

    async def scenario():
        config = app_settings(max_items=8, max_text_chars=100)
        async with running(create_app(config)) as client:
            await load(client, "t", files["lpi"][0], inbox)
            return await client.post("/embed", json=body)

    answer = run(scenario())
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["field"] == field


def test_oversized_images_and_bodies_are_refused(app_settings, artifacts):
    inbox, files = artifacts
    big = io.BytesIO()
    Image.new("L", (3000, 3000)).save(big, "PNG")  # 9 MP, a few KB compressed: a small bomb

    async def scenario():
        config = app_settings(max_image_pixels=1_000_000, max_body_bytes=64 * 1024)
        async with running(create_app(config)) as client:
            await load(client, "t", files["lpi"][0], inbox)
            pixels = await client.post(
                "/embed", json={"task": "t", "images": [b64(big.getvalue())]}
            )
            body = await client.post("/embed", json={"task": "t", "texts": ["x" * 70_000]})
            vector = await client.post(
                "/search", json={"task": "t", "query": {"vector": [0.5, 0.5]}}
            )
            empty_search = await client.post("/search", json={"task": "t", "query": {}})
            return pixels, body, vector, empty_search

    pixels, body, vector, empty_search = run(scenario())
    assert pixels.status_code == 413 and pixels.json()["error"]["field"] == "images[0]"
    assert body.status_code == 413 and body.json()["error"]["field"] == "body"
    assert vector.status_code == 422 and vector.json()["error"]["field"] == "query.vector"
    assert empty_search.status_code == 422 and empty_search.json()["error"]["field"] == "query"


def test_admin_and_api_keys(app_settings, artifacts):
    inbox, files = artifacts
    path = {"path": str(files["lpi"][0].relative_to(inbox))}

    async def scenario():
        config = app_settings(admin_key="admin-secret", api_key="query-secret")
        async with running(create_app(config)) as client:
            bearer = lambda key: {"authorization": f"Bearer {key}"}  # noqa: E731
            return [
                await client.put("/tasks/t", json=path),
                await client.put("/tasks/t", json=path, headers=bearer("query-secret")),
                await client.put("/tasks/t", json=path, headers=bearer("admin-secret")),
                await client.post("/embed", json={"task": "t", "texts": ["x"]}),
                await client.post(
                    "/embed", json={"task": "t", "texts": ["x"]}, headers=bearer("query-secret")
                ),
                await client.get("/healthz"),
            ]

    statuses = [r.status_code for r in run(scenario())]
    assert statuses == [401, 403, 200, 401, 200, 200]


def test_unload_and_metrics(app_settings, artifacts):
    inbox, files = artifacts

    async def scenario():
        async with running(create_app(app_settings())) as client:
            await load(client, "t", files["lpi"][0], inbox)
            await client.post("/embed", json={"task": "t", "texts": ["x", "y"]})
            await client.post("/index", json={"task": "t", "items": [{"text": "z"}]})
            metrics = (await client.get("/metrics")).text
            unloaded = await client.delete("/tasks/t", params={"delete_vectors": True})
            after = await client.post("/embed", json={"task": "t", "texts": ["x"]})
            tasks = (await client.get("/tasks")).json()
            ready = await client.get("/readyz")
            return metrics, unloaded.json(), after, tasks, ready.json()

    metrics, unloaded, after, tasks, ready = run(scenario())
    for name in (
        "lpi_requests_total",
        "lpi_request_seconds",
        "lpi_batch_rows",
        "lpi_queue_rows",
        "lpi_tasks_loaded",
        "lpi_task_swaps_total",
    ):
        assert name in metrics
    assert 'route="/embed",status="200",task="t"' in metrics
    assert unloaded["vectors_deleted"] and len(unloaded["unloaded_versions"]) == 1
    assert after.status_code == 404 and tasks == {"tasks": [], "failed": []}
    assert ready["ready"] and ready["tasks"] == 0


def test_routing_by_task_keys(app_settings, artifacts):
    """task='auto' sends each item to the task whose stored keys are nearest its bare vector,
    and embeds it with that task's prompt."""
    from export import read_artifact
    from lpi.routing import TaskKeys

    inbox, files = artifacts
    texts, images = ["a red square", "a dog", "a striped disc"], [b64(png_bytes(5))]
    keys = TaskKeys.from_centres(
        {f"task{i}": read_artifact(p).keys for i, p in enumerate(files["lpi"])}
    )

    async def scenario():
        async with running(create_app(app_settings())) as client:
            none = await client.post("/embed", json={"task": "auto", "texts": ["x"]})
            for i, path in enumerate(files["lpi"]):
                await load(client, f"task{i}", path, inbox)
            body = {"texts": texts, "images": images}
            bare = (await client.post("/embed", json=body)).json()
            routed = (await client.post("/embed", json=body | {"task": "auto"})).json()
            direct = {
                task: (await client.post("/embed", json=body | {"task": task})).json()
                for task in ("task0", "task1")
            }
            return none, bare, routed, direct

    none, bare, routed, direct = run(scenario())
    assert none.status_code == 409 and none.json()["error"]["field"] == "task"
    want_text = keys.route_names(torch.tensor(bare["text_embeddings"]), "text")
    want_image = keys.route_names(torch.tensor(bare["image_embeddings"]), "image")
    assert routed["text_tasks"] == want_text and routed["image_tasks"] == want_image
    for row, task in enumerate(want_text):  # each row embedded with its routed task's prompt
        got = routed["text_embeddings"][row]
        assert cosines([got], [direct[task]["text_embeddings"][row]]).min() >= MIN_COSINE


def test_concurrent_requests_across_tasks_with_swaps(app_settings, artifacts, backbone):
    """In-process version of the socket test: every answer's version computed its vectors."""
    inbox, files = artifacts
    texts = ["a red square", "a blue circle"]
    by_version = {}
    for path in files["lpi"] + files["dense"]:
        features = reference_features(backbone, path, texts)["text"]
        by_version[lpi_version(path)] = features

    async def scenario():
        async with running(create_app(app_settings())) as client:
            tasks = [f"task{i}" for i in range(4)]
            for i, task in enumerate(tasks):
                await load(client, task, files["lpi"][i % 2], inbox)

            async def swapper():
                for n in range(6):
                    for i, task in enumerate(tasks):
                        method = "dense" if n % 2 == 0 else "lpi"
                        await load(client, task, files[method][i % 2], inbox)
                    await asyncio.sleep(0.01)

            async def one(n):
                return await client.post(
                    "/embed", json={"task": tasks[n % len(tasks)], "texts": texts}
                )

            answers = await asyncio.gather(swapper(), *(one(n) for n in range(60)))
            return answers[1:]

    answers = run(scenario())
    assert [a.status_code for a in answers] == [200] * len(answers)
    versions = {a.json()["prompt_version"] for a in answers}
    assert len(versions) >= 2  # the swaps really happened in between
    for answer in answers:
        body = answer.json()
        want = by_version[body["prompt_version"]]
        assert cosines(body["text_embeddings"], want).min() >= MIN_COSINE


def lpi_version(path) -> str:
    from export import read_artifact

    return read_artifact(path).prompt_version


def test_torch_threads_are_not_changed_without_a_setting(app_settings):
    threads = torch.get_num_threads()

    async def scenario():
        async with running(create_app(app_settings())):
            return torch.get_num_threads()

    assert run(scenario()) == threads
