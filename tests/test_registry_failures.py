"""Store failures in the middle of task admin, through the real app: an unload whose vector
delete fails leaves the task listed, serving and retryable; a load whose store step fails
leaves no new artifact copy and the old version serving; `skip_existing` errors name the item
by its place in the request.
"""

from __future__ import annotations

import pytest

from server.app import create_app
from server.store import StoreError, UnknownTaskError
from tests.app_fixtures import load
from tests.server_helpers import run, running

ITEMS = [{"id": str(i), "text": text} for i, text in enumerate(["a cat", "a dog", "a bird"])]


class Flaky:
    """Wraps one store (or backend) method: the first `times` calls raise `error`."""

    def __init__(self, method, error: BaseException, times: int = 1) -> None:
        self.method, self.error, self.left = method, error, times

    def __call__(self, *args, **kwargs):
        if self.left > 0:
            self.left -= 1
            raise self.error
        return self.method(*args, **kwargs)


@pytest.mark.parametrize(
    ("where", "error", "said"),
    [
        ("store", StoreError("qdrant did not answer", "task"), "qdrant did not answer"),
        # a backend failure half-way (the serving alias already dropped): its message may
        # name server paths, so only its type is shown; the log has the rest
        ("backend", OSError("/srv/secret/qdrant: disk full"), "OSError"),
    ],
)
def test_a_failed_vector_delete_leaves_the_task_listed_and_retryable(
    app_settings, artifacts, monkeypatch, where, error, said
):
    inbox, files = artifacts

    async def scenario():
        app = create_app(app_settings())
        async with running(app) as client:
            await load(client, "t", files["lpi"][0], inbox)
            indexed = await client.post("/index", json={"task": "t", "items": ITEMS})
            assert indexed.status_code == 200, indexed.text
            store = app.state.service.store
            if where == "store":
                monkeypatch.setattr(store, "delete_task", Flaky(store.delete_task, error))
            else:
                backend = store._backend
                monkeypatch.setattr(
                    backend, "drop_collection", Flaky(backend.drop_collection, error)
                )
            failed = await client.delete("/tasks/t", params={"delete_vectors": "true"})
            listed = (await client.get("/tasks")).json()["tasks"]
            search = await client.post("/search", json={"task": "t", "query": {"text": "a dog"}})
            embed = await client.post("/embed", json={"task": "t", "texts": ["a dog"]})
            retried = await client.delete("/tasks/t", params={"delete_vectors": "true"})
            gone = await client.get("/tasks/t")
            with pytest.raises(UnknownTaskError):
                store.versions("t")
            return failed, listed, search, embed, retried, gone

    failed, listed, search, embed, retried, gone = run(scenario())
    assert failed.status_code == 503, failed.text
    body = failed.json()["error"]
    assert body["field"] == "task" and body["type"] == "store_unavailable"
    assert "deleting its vectors failed" in body["message"] and said in body["message"]
    assert "/srv/secret" not in body["message"]
    assert [t["task"] for t in listed] == ["t"]  # still listed, still serving
    assert search.status_code == 200 and search.json()["hits"][0]["id"] == "1", search.text
    assert embed.status_code == 200
    assert retried.status_code == 200 and retried.json()["vectors_deleted"] is True, retried.text
    assert gone.status_code == 404


@pytest.mark.parametrize("replacing", [False, True])
def test_a_load_whose_store_step_fails_leaves_no_new_file(
    app_settings, artifacts, monkeypatch, replacing
):
    """The engine add and the copy succeed, then the store refuses: the copy goes too."""
    inbox, files = artifacts
    old_file, new_file = files["lpi"][0], files["dense"][0]

    async def scenario():
        app = create_app(app_settings())
        async with running(app) as client:
            old = None
            if replacing:
                old = (await load(client, "t", old_file, inbox))["task"]["prompt_version"]
            kept = app.state.service.registry.state.root / "artifacts"
            before = sorted(p.relative_to(kept) for p in kept.rglob("*"))
            store = app.state.service.store
            failing = Flaky(store.ensure_task, StoreError("qdrant did not answer", "task"))
            monkeypatch.setattr(store, "ensure_task", failing)
            path = str(new_file.relative_to(inbox))
            refused = await client.put("/tasks/t", json={"path": path})
            after = sorted(p.relative_to(kept) for p in kept.rglob("*"))
            embed = await client.post("/embed", json={"task": "t", "texts": ["a dog"]})
            engine_keys = app.state.service.engine.loaded()
            again = await client.put("/tasks/t", json={"path": path})  # the store is back
            return old, before, refused, after, embed, engine_keys, again

    old, before, refused, after, embed, engine_keys, again = run(scenario())
    assert refused.status_code == 503 and refused.json()["error"]["field"] == "task"
    assert after == before  # no new file, no new folder
    assert engine_keys == ([("t", old)] if replacing else [])
    if replacing:
        assert embed.status_code == 200 and embed.json()["prompt_version"] == old
    else:
        assert embed.status_code == 404
    assert again.status_code == 200, again.text
    assert again.json()["task"]["prompt_version"] != old


def test_skip_existing_errors_name_the_item_by_its_place_in_the_request(app_settings, artifacts):
    inbox, files = artifacts
    bad_image = "not base64 at all!"

    async def scenario():
        async with running(create_app(app_settings())) as client:
            await load(client, "t", files["lpi"][0], inbox)
            first = await client.post("/index", json={"task": "t", "items": ITEMS[:2]})
            assert first.status_code == 200, first.text
            index = lambda items: client.post(  # noqa: E731
                "/index", json={"task": "t", "items": items, "skip_existing": True}
            )
            return [
                await index([ITEMS[0], {"id": "x", "image": bad_image}]),
                await index(
                    [ITEMS[0], ITEMS[1], {"id": "y", "text": "ok"}, {"id": "z", "image": bad_image}]
                ),
                await index([{"id": "w", "image": bad_image}, ITEMS[0]]),
                await index([ITEMS[1], {"id": "v", "text": "hi", "thumbnail": 64}]),
            ]

    answers = run(scenario())
    expected = ["items[1].image", "items[3].image", "items[0].image", "items[1].thumbnail"]
    for answer, field in zip(answers, expected, strict=True):
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error["field"] == field, error
        assert error["message"].startswith(field), error
