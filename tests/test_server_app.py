"""The real app in-process (httpx ASGI transport): the routes against the model, swaps, errors.

Embeddings are compared per vector with the direct model call (cosine >= 0.9999: the server
runs the same fp32 math through the slot pool, so only summation order may differ).
"""

from __future__ import annotations

import asyncio
import io
import shutil

import pytest
import torch
from PIL import Image

import lpi
from tests.server_helpers import (
    b64,
    cosines,
    create_app,
    export_artifacts,
    png_bytes,
    reference_features,
    run,
    running,
    settings,
)

MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def artifacts(tiny_runs, tmp_path_factory):
    inbox = tmp_path_factory.mktemp("inbox")
    return inbox, export_artifacts(tiny_runs, inbox)


@pytest.fixture(scope="module")
def backbone(tiny_runs):
    return lpi.load_backbone(tiny_runs / "backbone.safetensors")


@pytest.fixture
def app_settings(tiny_runs, artifacts, tmp_path):
    inbox, _ = artifacts
    return lambda **kw: settings(tiny_runs, tmp_path / "data", inbox, **kw)


def relative(path, inbox) -> str:
    return str(path.relative_to(inbox))


async def load(client, task, path, inbox, **extra):
    response = await client.put(f"/tasks/{task}", json={"path": relative(path, inbox), **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_embed_equals_the_direct_model_call(app_settings, artifacts, backbone):
    inbox, files = artifacts
    artifact = files["lpi"][0]
    texts, images = ["a red square", "two blue circles on grey"], [png_bytes(1), png_bytes(2)]

    async def scenario():
        async with running(create_app(app_settings())) as client:
            await load(client, "animals", artifact, inbox)
            prompted = await client.post("/embed", json={
                "task": "animals", "texts": texts, "images": [b64(i) for i in images]
            })  # fmt: skip
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
            items = [{"id": f"t{i}", "text": c, "payload": {"kind": "text", "n": i}}
                     for i, c in enumerate(captions)]  # fmt: skip
            items += [{"id": f"i{i}", "image": b64(b), "payload": {"kind": "image"}}
                      for i, b in enumerate(images)]  # fmt: skip
            indexed = await client.post("/index", json={"task": "shapes", "items": items})
            assert indexed.status_code == 200, indexed.text
            found = []
            for i, caption in enumerate(captions):
                r = await client.post("/search", json={
                    "task": "shapes", "query": {"text": caption}, "top_k": 3,
                    "filter": {"kind": "text"},
                })  # fmt: skip
                found.append((f"t{i}", r.json()))
            r = await client.post(
                "/search", json={"task": "shapes", "query": {"image": b64(images[2])}, "top_k": 1}
            )
            found.append(("i2", r.json()))
            vector = await client.post("/embed", json={"task": "shapes", "texts": [captions[1]]})
            r = await client.post("/search", json={
                "task": "shapes", "query": {"vector": vector.json()["text_embeddings"][0]},
            })  # fmt: skip
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


def test_a_task_loaded_at_runtime_serves_the_next_request(app_settings, artifacts):
    inbox, files = artifacts

    async def scenario():
        async with running(create_app(app_settings())) as client:
            before = await client.post("/embed", json={"task": "late", "texts": ["x"]})
            loaded = await load(client, "late", files["lpi"][1], inbox)
            after = await client.post("/embed", json={"task": "late", "texts": ["x"]})
            return before, loaded, after

    before, loaded, after = run(scenario())
    assert before.status_code == 404 and before.json()["error"]["field"] == "task"
    assert after.status_code == 200
    assert after.json()["prompt_version"] == loaded["task"]["prompt_version"]


def test_replace_keeps_searching_the_old_version_until_promoted(app_settings, artifacts):
    """A new prompt version indexes into its own collection; /search compares like with like."""
    inbox, files = artifacts
    old_file, new_file = files["lpi"][0], files["dense"][0]

    async def scenario():
        async with running(create_app(app_settings())) as client:
            old = (await load(client, "t", old_file, inbox))["task"]["prompt_version"]
            await client.post("/index", json={"task": "t", "items": [{"id": "a", "text": "a cat"}]})
            swap = await load(client, "t", new_file, inbox)
            new = swap["task"]["prompt_version"]
            search = lambda **kw: client.post(  # noqa: E731
                "/search", json={"task": "t", "query": {"text": "a cat"}, **kw}
            )
            during = (await search()).json()
            mismatch = (await search(accept_mismatch=True)).json()
            embed = (await client.post("/embed", json={"task": "t", "texts": ["a cat"]})).json()
            reindex = await client.post(
                "/index", json={"task": "t", "items": [{"id": "a", "text": "a cat"}]}
            )
            promoted = await client.post("/tasks/t/promote", json={"version": new})
            after = (await search()).json()
            info = (await client.get("/tasks/t")).json()
            return old, new, swap, during, mismatch, embed, reindex.json(), promoted, after, info

    old, new, swap, during, mismatch, embed, reindex, promoted, after, info = run(scenario())
    assert old != new and swap["previous_version"] == old and swap["changed"]
    assert swap["task"]["serving_version"] == old
    assert sorted(swap["task"]["loaded_versions"]) == sorted([old, new])
    assert during["prompt_version"] == during["index_version"] == old
    assert during["hits"][0]["id"] == "a"
    assert mismatch["prompt_version"] == new and mismatch["index_version"] == old
    assert embed["prompt_version"] == new
    assert reindex["prompt_version"] == new and reindex["serving"] is False
    assert promoted.status_code == 200 and promoted.json()["serving_version"] == new
    assert after["prompt_version"] == after["index_version"] == new
    assert after["hits"][0]["id"] == "a"
    assert info["loaded_versions"] == [new]  # the old version left the engine


def test_failed_loads_leave_the_old_version_serving(app_settings, artifacts, tmp_path):
    inbox, files = artifacts
    good = files["lpi"][0]
    corrupt = inbox / "corrupt.safetensors"
    data = bytearray(good.read_bytes())
    data[-20] ^= 0xFF
    corrupt.write_bytes(bytes(data))

    async def scenario():
        async with running(create_app(app_settings())) as client:
            version = (await load(client, "t", good, inbox))["task"]["prompt_version"]
            answers = [
                await client.put("/tasks/t", json={"path": "corrupt.safetensors"}),
                await client.put("/tasks/t", content=b"not a safetensors file",
                                 headers={"content-type": "application/octet-stream"}),
                await client.put("/tasks/t", json={"path": "../../etc/passwd"}),
                await client.put("/tasks/t", json={"path": "/etc/passwd"}),
                await client.put("/tasks/t", json={"path": "missing.safetensors"}),
            ]  # fmt: skip
            embed = await client.post("/embed", json={"task": "t", "texts": ["x"]})
            return version, answers, embed.json()

    version, answers, embed = run(scenario())
    statuses = [a.status_code for a in answers]
    assert statuses == [422, 422, 422, 422, 404], [a.text for a in answers]
    assert [a.json()["error"]["field"] for a in answers] == [
        "artifact", "artifact", "path", "path", "path"
    ]  # fmt: skip
    assert embed["prompt_version"] == version


def test_an_artifact_for_another_backbone_is_refused(tiny_runs, artifacts, tmp_path):
    inbox, files = artifacts
    other = lpi.save_backbone(lpi.load_backbone("tiny", seed=11), tmp_path / "other.safetensors")
    config = settings(tiny_runs, tmp_path / "data", inbox, backbone=str(other))

    async def scenario():
        async with running(create_app(config)) as client:
            return await client.put(
                "/tasks/t", json={"path": str(files["lpi"][0].relative_to(inbox))}
            )

    answer = run(scenario())
    assert answer.status_code == 422
    assert answer.json()["error"]["field"] == "artifact"
    assert "backbone" in answer.json()["error"]["message"]


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
    for name in ("lpi_requests_total", "lpi_request_seconds", "lpi_batch_rows",
                 "lpi_queue_rows", "lpi_tasks_loaded", "lpi_task_swaps_total"):  # fmt: skip
        assert name in metrics
    assert 'route="/embed",status="200",task="t"' in metrics
    assert unloaded["vectors_deleted"] and len(unloaded["unloaded_versions"]) == 1
    assert after.status_code == 404 and tasks == {"tasks": []}
    assert ready["ready"] and ready["tasks"] == 0


def test_routing_by_task_keys(app_settings, artifacts):
    """task='auto' sends each item to the task whose stored keys are nearest its bare vector,
    and embeds it with that task's prompt."""
    from export import read_artifact
    from lpi.routing import TaskKeys

    inbox, files = artifacts
    texts, images = ["a red square", "a dog", "a striped disc"], [b64(png_bytes(5))]
    keys = TaskKeys.from_centres({f"task{i}": read_artifact(p).keys for i, p in
                                  enumerate(files["lpi"])})  # fmt: skip

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


def test_the_registry_comes_back_after_a_restart(tiny_runs, artifacts, tmp_path):
    """Local store and registry on disk: a new app serves the same versions and vectors."""
    inbox, files = artifacts
    config = settings(tiny_runs, tmp_path / "data", inbox, store="local")

    async def first():
        async with running(create_app(config)) as client:
            await load(client, "a", files["lpi"][0], inbox)
            await load(client, "b", files["lpi"][1], inbox)
            await load(client, "b", files["dense"][1], inbox)  # b: active dense, serving lpi
            await client.post("/index", json={"task": "a", "items": [{"id": "k", "text": "x"}]})
            return (await client.get("/tasks")).json()

    async def second():
        async with running(create_app(config)) as client:
            search = await client.post("/search", json={"task": "a", "query": {"text": "x"}})
            return (await client.get("/tasks")).json(), search.json()

    before = run(first())
    after, search = run(second())
    strip = lambda tasks: [  # noqa: E731
        {k: v for k, v in t.items() if k != "loaded_at"} for t in tasks["tasks"]
    ]
    assert strip(after) == strip(before)
    assert search["hits"][0]["id"] == "k"


def test_uploaded_artifacts_are_kept_for_restarts(tiny_runs, artifacts, tmp_path):
    """An upload is copied into the state directory, so deleting the source loses nothing."""
    inbox, files = artifacts
    source = tmp_path / "upload.safetensors"
    shutil.copy(files["lpi"][0], source)
    config = settings(tiny_runs, tmp_path / "data", inbox, store="local")

    async def upload():
        async with running(create_app(config)) as client:
            r = await client.put("/tasks/u", content=source.read_bytes(),
                                 headers={"content-type": "application/octet-stream"})  # fmt: skip
            return r.json()

    async def restart():
        async with running(create_app(config)) as client:
            return (await client.get("/tasks/u")).json()

    loaded = run(upload())
    source.unlink()
    assert run(restart())["prompt_version"] == loaded["task"]["prompt_version"]
    assert not list((tmp_path / "data" / "registry" / "uploads").glob("*"))


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


def test_reloading_an_unloaded_task_with_a_new_version_takes_over_search(app_settings, artifacts):
    """Vectors kept from an unloaded version cannot be queried: the new version serves."""
    inbox, files = artifacts

    async def scenario():
        async with running(create_app(app_settings())) as client:
            await load(client, "t", files["lpi"][0], inbox)
            await client.post("/index", json={"task": "t", "items": [{"id": "old", "text": "x"}]})
            await client.delete("/tasks/t")
            again = await load(client, "t", files["dense"][0], inbox)
            await client.post("/index", json={"task": "t", "items": [{"id": "new", "text": "x"}]})
            found = await client.post("/search", json={"task": "t", "query": {"text": "x"}})
            return again, found

    again, found = run(scenario())
    assert again["task"]["serving_version"] == again["task"]["prompt_version"]
    assert [h["id"] for h in found.json()["hits"]] == ["new"]


def test_task_loads_and_swaps_touch_no_backbone_weight(app_settings, artifacts):
    inbox, files = artifacts
    app = create_app(app_settings())

    async def scenario():
        async with running(app) as client:
            backbone = app.state.service.engine.backbone
            before = {k: v.clone() for k, v in backbone.state_dict().items()}
            for path in (files["lpi"][0], files["dense"][0], files["lpi"][1]):
                await load(client, "t", path, inbox, promote=True)
            await client.delete("/tasks/t")
            after = backbone.state_dict()
            return before, after

    before, after = run(scenario())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
