"""Task versions in the real app, in-process: loads at runtime, replacements and promotes, failed
loads that change nothing, restarts, and that no load touches a backbone weight.
"""

from __future__ import annotations

import shutil

import torch

import lpi
from tests.app_fixtures import load
from tests.server_helpers import (
    create_app,
    run,
    running,
    settings,
)


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
                await client.put(
                    "/tasks/t",
                    content=b"not a safetensors file",
                    headers={"content-type": "application/octet-stream"},
                ),
                await client.put("/tasks/t", json={"path": "../../etc/passwd"}),
                await client.put("/tasks/t", json={"path": "/etc/passwd"}),
                await client.put("/tasks/t", json={"path": "missing.safetensors"}),
            ]
            embed = await client.post("/embed", json={"task": "t", "texts": ["x"]})
            return version, answers, embed.json()

    version, answers, embed = run(scenario())
    statuses = [a.status_code for a in answers]
    assert statuses == [422, 422, 422, 422, 404], [a.text for a in answers]
    assert [a.json()["error"]["field"] for a in answers] == [
        "artifact",
        "artifact",
        "path",
        "path",
        "path",
    ]
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
            r = await client.put(
                "/tasks/u",
                content=source.read_bytes(),
                headers={"content-type": "application/octet-stream"},
            )
            return r.json()

    async def restart():
        async with running(create_app(config)) as client:
            return (await client.get("/tasks/u")).json()

    loaded = run(upload())
    source.unlink()
    assert run(restart())["prompt_version"] == loaded["task"]["prompt_version"]
    assert not list((tmp_path / "data" / "registry" / "uploads").glob("*"))


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
