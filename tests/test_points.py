"""Stored points by id or filter (POST /points/count, /points/list, /points/delete) through the
server and both stores, and index-time thumbnails (size-limited JPEG data URIs in payloads)."""

from __future__ import annotations

import base64
import io
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image

import lpi
from export.tasks import export_run
from server.app import create_app
from server.settings import Settings
from server.store import EdgeStore, QdrantStore
from tests.server_helpers import b64, png_bytes, run, running

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def setup(tiny_runs, tmp_path_factory):
    backbone = lpi.load_backbone(tiny_runs / "backbone.safetensors")
    inbox = tmp_path_factory.mktemp("inbox")
    artifact = export_run(tiny_runs / "lpi", backbone, inbox)[0]
    return tiny_runs / "backbone.safetensors", inbox, artifact.path.relative_to(inbox).as_posix()


def _app(setup, tmp_path, **overrides):
    backbone, inbox, _ = setup
    values = dict(backbone=str(backbone), data_dir=tmp_path, artifact_dir=inbox, store="memory")
    return create_app(Settings(**(values | overrides)))


async def _load(client: httpx.AsyncClient, setup) -> str:
    task = f"t-{uuid.uuid4().hex[:8]}"
    answer = await client.put(f"/tasks/{task}", json={"path": setup[2]})
    assert answer.status_code == 200, answer.text
    return task


@pytest.mark.parametrize("store", ["memory", "edge"])
def test_count_list_delete_through_the_api(setup, tmp_path, store):
    async def scenario():
        async with running(_app(setup, tmp_path, store=store)) as client:
            task = await _load(client, setup)
            items = [
                {"id": f"p{i}", "text": f"item {i}", "payload": {"odd": i % 2 == 1, "n": i}}
                for i in range(23)
            ]
            assert (await client.post("/index", json={"task": task, "items": items})).is_success
            count = await client.post("/points/count", json={"task": task})
            assert count.json()["count"] == 23
            odd = await client.post("/points/count", json={"task": task, "filter": {"odd": True}})
            assert odd.json()["count"] == 11
            seen, offset = {}, None
            while True:  # pages of 5 until next_offset is null
                page = await client.post(
                    "/points/list", json={"task": task, "limit": 5, "offset": offset}
                )
                body = page.json()
                assert page.status_code == 200 and body["count"] == len(body["points"]) <= 5
                seen |= {p["id"]: p["payload"] for p in body["points"]}
                if (offset := body["next_offset"]) is None:
                    break
            assert seen == {item["id"]: item["payload"] for item in items}
            gone = await client.post(
                "/points/delete", json={"task": task, "ids": ["p0", "p1", "nope"]}
            )
            assert gone.json()["count"] == 2
            gone = await client.post(
                "/points/delete", json={"task": task, "filter": {"odd": False}}
            )
            assert gone.json()["count"] == 11  # p0 was even and is gone already: 12 - 1
            left = await client.post("/points/list", json={"task": task, "limit": 100})
            assert sorted(p["id"] for p in left.json()["points"]) == sorted(
                f"p{i}" for i in range(3, 23, 2)
            )
            hits = await client.post(
                "/search", json={"task": task, "query": {"text": "item 4"}, "top_k": 30}
            )
            assert {h["id"] for h in hits.json()["hits"]} == {f"p{i}" for i in range(3, 23, 2)}

    run(scenario())


def test_points_refusals_name_the_field(setup, tmp_path):
    async def scenario():
        async with running(_app(setup, tmp_path)) as client:
            task = await _load(client, setup)
            cases = [
                ("/points/delete", {"task": task}, 422, "ids"),
                ("/points/delete", {"task": task, "ids": ["a"], "filter": {"k": 1}}, 422, "ids"),
                ("/points/delete", {"task": task, "ids": []}, 422, "ids"),
                ("/points/list", {"task": task, "offset": "not-an-offset"}, 422, "offset"),
                ("/points/list", {"task": task, "limit": 0}, 422, "limit"),
                ("/points/count", {"task": "nope"}, 404, "task"),
                ("/points/count", {"task": task, "filter": {"task": "x"}}, 422, "filter"),
            ]
            for path, body, status, field in cases:
                answer = await client.post(path, json=body)
                assert answer.status_code == status, (path, body, answer.text)
                assert answer.json()["error"]["field"] == field, (body, answer.text)

    run(scenario())


@pytest.mark.parametrize(
    "make",
    [
        lambda d: QdrantStore(location=":memory:", layout="tenant"),
        lambda d: EdgeStore(d, layout="tenant"),
    ],
)
def test_stores_keep_to_one_version_in_the_tenant_layout(tmp_path, make):
    """Another version's points sharing the collection are never counted, listed or deleted."""
    store = make(tmp_path)
    rng = np.random.default_rng()
    for version, n in (("v1", 7), ("v2", 4)):
        store.ensure_task("t", 8, version)
        ids = [f"{version}-{i}" for i in range(n)]
        store.upsert("t", version, ids, rng.normal(size=(n, 8)), [{"k": i % 2} for i in range(n)])
    assert (store.count("t", "v1"), store.count("t", "v2", {"k": 1})) == (7, 2)
    rows, after = store.list_points("t", "v2", limit=10)
    assert after is None and sorted(r[0] for r in rows) == [f"v2-{i}" for i in range(4)]
    assert store.delete_points("t", "v1", filter={"k": 0}) == 4
    assert (store.count("t", "v1"), store.count("t", "v2")) == (3, 4)
    assert store.delete_points("t", "v2", ids=["v1-1", "v2-1"]) == 1  # v1-1 is not v2's
    assert (store.count("t", "v1"), store.count("t", "v2")) == (3, 3)
    store.close()


def _jpeg_of(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_thumbnails_are_stored_small_and_refused_when_oversized(setup, tmp_path):
    async def scenario():
        app = _app(setup, tmp_path, thumbnail_max_side=64, thumbnail_max_bytes=4096)
        async with running(app) as client:
            task = await _load(client, setup)
            big = png_bytes(int(np.random.default_rng().integers(10**6)), size=(300, 200))
            items = [
                {"id": "a", "image": b64(big)},
                {"id": "b", "image": "data:image/png;base64," + b64(big), "thumbnail": 32},
                {"id": "c", "image": b64(big), "thumbnail": False, "payload": {"k": 1}},
                {"id": "d", "text": "no image"},
            ]
            answer = await client.post(
                "/index", json={"task": task, "items": items, "thumbnail": True}
            )
            assert answer.status_code == 200, answer.text
            listed = await client.post("/points/list", json={"task": task})
            payloads = {p["id"]: p["payload"] for p in listed.json()["points"]}
            sizes = {k: _jpeg_of(payloads[k]["thumbnail"]).size for k in ("a", "b")}
            assert sizes == {"a": (64, 43), "b": (32, 21)}  # aspect kept, largest side as asked
            assert all(len(payloads[k]["thumbnail"]) * 3 / 4 <= 4096 + 3 for k in ("a", "b"))
            assert payloads["c"] == {"k": 1} and payloads["d"] == {}
            refusals = [
                ({"image": b64(big), "thumbnail": 65}, 413, "items[0].thumbnail", "64 pixels"),
                ({"text": "x", "thumbnail": True}, 422, "items[0].thumbnail", "only image"),
                (
                    {"image": b64(big), "thumbnail": True, "payload": {"thumbnail": "mine"}},
                    422,
                    "items[0].payload.thumbnail",
                    "writes this key",
                ),
            ]
            for item, status, field, words in refusals:
                answer = await client.post("/index", json={"task": task, "items": [item]})
                assert answer.status_code == status, answer.text
                error = answer.json()["error"]
                assert error["field"] == field and words in error["message"], error

    run(scenario())


def test_a_thumbnail_over_the_byte_limit_is_refused_naming_it(setup, tmp_path):
    async def scenario():
        app = _app(setup, tmp_path, thumbnail_max_side=512, thumbnail_max_bytes=1024)
        async with running(app) as client:
            task = await _load(client, setup)
            noise = png_bytes(int(np.random.default_rng().integers(10**6)), size=(512, 512))
            item = {"image": b64(noise), "thumbnail": True}
            answer = await client.post("/index", json={"task": task, "items": [item]})
            assert answer.status_code == 413, answer.text
            error = answer.json()["error"]
            assert error["field"] == "items[0].image" and "1024 bytes" in error["message"]
            count = await client.post("/points/count", json={"task": task})
            assert count.json()["count"] == 0  # nothing stored

    run(scenario())
