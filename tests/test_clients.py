"""The SDK twins and the `lpi` CLI against the real app, in-process.

Every SDK test takes `connect`, which is parametrised over the twins: the sync `Client` through
a sync transport that runs the app on a background event loop (an anyio portal, where the
app's lifespan runs too), and the `AsyncClient` through `httpx.ASGITransport`, its calls run on
that same loop. So one suite checks both, method for method. Retry and error mapping use
`httpx.MockTransport` with the sleeps recorded instead of slept.
"""

from __future__ import annotations

import base64
import inspect
import io
import json
import math
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from PIL import Image

import lpi
from clients import (
    AsyncClient,
    AuthError,
    BadRequestError,
    Client,
    ConflictError,
    NotFoundError,
    image_item,
    schema,
    text_item,
)
from clients.base import BaseClient
from clients.cli import main
from export.tasks import export_run
from server.app import create_app
from server.settings import Settings
from tests.client_twins import PortalTransport, Twin

API, ADMIN = "query-key", "admin-key"


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tiny_runs, tmp_path_factory) -> dict[str, Path]:
    """Both tasks of the LPI run and the dense run, exported into the server's inbox."""
    backbone = lpi.load_backbone(tiny_runs / "backbone.safetensors")
    inbox = tmp_path_factory.mktemp("inbox")
    found = {"inbox": inbox, "backbone": tiny_runs / "backbone.safetensors"}
    for method in ("lpi", "dense"):
        for artifact in export_run(tiny_runs / method, backbone, inbox / method):
            found[f"{method}/{artifact.task_id}"] = artifact.path
    return found


@pytest.fixture(scope="module")
def app(artifacts, portal, tmp_path_factory):
    settings = Settings(
        backbone=str(artifacts["backbone"]),
        data_dir=tmp_path_factory.mktemp("data"),
        artifact_dir=artifacts["inbox"],
        store="memory",
        api_key=API,
        admin_key=ADMIN,
    )
    app = create_app(settings)
    with portal.wrap_async_context_manager(app.router.lifespan_context(app)):
        yield app


@pytest.fixture
def client(connect, app) -> Twin:
    return connect(app=app, api_key=API, admin_key=ADMIN)


def fresh_task(client: Twin, artifacts, artifact: str = "lpi/shapes-colours") -> str:
    """A task of its own for one test (the app is shared), loaded from the inbox."""
    task = f"t-{uuid.uuid4().hex[:10]}"
    relative = artifacts[artifact].relative_to(artifacts["inbox"]).as_posix()
    client.load_task(task, server_path=relative)
    return task


def png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b)
    )


# -- the twins mirror each other ----------------------------------------------------------------


def test_twins_mirror_each_other_method_for_method():
    def public(cls) -> dict:
        return {n: f for n, f in vars(cls).items() if not n.startswith("_") and callable(f)}

    sync, aio = public(Client), public(AsyncClient)
    assert sync.keys() == aio.keys()
    plans = {n[1:] for n in vars(BaseClient) if n.startswith("_") and not n.startswith("__")}
    assert plans - {"request", "answer", "failure", "retrying"} <= sync.keys()
    for name, method in sync.items():
        assert inspect.signature(method) == inspect.signature(aio[name]), name
        assert inspect.iscoroutinefunction(aio[name]) and not inspect.iscoroutinefunction(method)
        assert method.__doc__ and method.__doc__ == aio[name].__doc__, name


# -- every method against the real app, through both twins --------------------------------------


def test_health_ready_and_metrics(client):
    assert client.health() == schema.Health(status="ok")
    ready = client.ready()
    assert isinstance(ready, schema.Readiness) and ready.ready and ready.engine == "torch"
    assert "lpi_requests_total" in client.metrics()


def test_task_lifecycle(client, artifacts):
    task = f"t-{uuid.uuid4().hex[:10]}"
    loaded = client.load_task(task, server_path="lpi/shapes-colours.safetensors")
    assert loaded.changed and loaded.previous_version is None
    first = loaded.task.prompt_version
    assert loaded.task.serving_version == first and loaded.task.method == "lpi"
    assert client.get_task(task) == loaded.task
    assert task in {info.task for info in client.list_tasks().tasks}

    # Upload a local file: the dense version is loaded beside the first, which still serves.
    replaced = client.load_task(task, artifacts["dense/shapes-colours"])
    second = replaced.task.prompt_version
    assert replaced.changed and replaced.previous_version == first and second != first
    assert sorted(replaced.task.loaded_versions) == sorted([first, second])
    # The same bytes again change nothing.
    again = client.load_task(task, artifacts["dense/shapes-colours"].read_bytes())
    assert not again.changed and again.task.prompt_version == second

    promoted = client.promote(task, second)  # the first version is no longer needed: dropped
    assert promoted.serving_version == second and promoted.loaded_versions == [second]
    unloaded = client.unload_task(task, delete_vectors=True)
    assert unloaded.unloaded_versions == [second]
    assert unloaded.vectors_deleted
    with pytest.raises(NotFoundError) as err:
        client.get_task(task)
    assert err.value.field == "task" and err.value.type == "unknown_task"


def test_embed_texts_and_images(client, artifacts, tmp_path):
    task = fresh_task(client, artifacts)
    texts = ["a red square", "two blue circles", "stripes", "a star", "a green triangle"]
    whole = client.embed(texts=texts, task=task)
    assert whole.task == task and whole.prompt_version == whole.prompt_versions[task]
    assert len(whole.text_embeddings) == len(texts)

    # Three requests of at most two texts each, merged: the same vectors in the same order
    # (per-row cosine: rows batched differently may differ in the last float bits).
    chunked = client.embed_texts(texts, task, chunk_size=2)
    assert chunked.prompt_version == whole.prompt_version
    for a, b in zip(chunked.text_embeddings, whole.text_embeddings, strict=True):
        assert cosine(a, b) >= 0.999

    # Images as bytes, a path and a PIL image are the same image.
    red = png((200, 10, 10))
    (tmp_path / "red.png").write_bytes(red)
    pil = Image.open(io.BytesIO(red))
    images = client.embed_images([red, tmp_path / "red.png", str(tmp_path / "red.png"), pil], task)
    rows = images.image_embeddings
    assert len(rows) == 4 and all(cosine(rows[0], row) >= 0.999 for row in rows)

    both = client.embed(texts=["a red square"], images=[red], task=task)
    assert len(both.text_embeddings) == len(both.image_embeddings) == 1
    bare = client.embed_texts(["a red square"])
    assert bare.task is None and bare.prompt_version is None and bare.prompt_versions == {}
    routed = client.embed_texts(["a red square", "stripes"], "auto", chunk_size=1)
    assert routed.task == "auto" and len(routed.text_tasks) == 2


def test_index_and_search(client, artifacts, tmp_path):
    task = fresh_task(client, artifacts)
    red, blue = png((200, 10, 10)), png((10, 10, 200))
    (tmp_path / "blue.png").write_bytes(blue)
    indexed = client.index(
        task,
        [
            text_item("a red square", id="t1", payload={"colour": "red", "n": 1}),
            image_item(red, id="i1", payload={"colour": "red"}),
            {"text": "two blue circles", "id": "t2", "payload": {"colour": "blue"}},
            schema.IndexItem(image=base64.b64encode(blue).decode(), id="i2"),
            text_item("no id given"),
        ],
    )
    assert indexed.ids[:4] == ["t1", "i1", "t2", "i2"] and indexed.serving
    uuid.UUID(indexed.ids[4])  # given by the client, so a retry cannot duplicate it

    many = client.index_many(
        task,
        (text_item(f"item {i}", id=f"m{i}") for i in range(5)),  # lazy
        chunk_size=2,  # progress (the default) draws nothing off a terminal
    )
    assert [len(a.ids) for a in many] == [2, 2, 1]
    assert client.get_task(task).vectors == 10

    by_text = client.search(task, text="a red square", top_k=3)
    assert by_text.hits[0].id == "t1" and by_text.hits[0].payload == {"colour": "red", "n": 1}
    assert by_text.prompt_version == by_text.index_version == indexed.prompt_version
    assert [h.id for h in client.search(task, image=red, top_k=1).hits] == ["i1"]
    assert [h.id for h in client.search(task, image=tmp_path / "blue.png", top_k=1).hits] == ["i2"]
    vector = client.embed_texts(["two blue circles"], task).text_embeddings[0]
    assert client.search(task, vector=vector, top_k=1).hits[0].id == "t2"
    blue_hits = client.search(task, text="a red square", filter={"colour": "blue"})
    assert {h.id for h in blue_hits.hits} == {"t2"}
    assert len(client.search(task, text="x", top_k=2, accept_mismatch=True).hits) == 2


def test_refusals_raise_typed_errors_naming_the_field(client, connect, app, artifacts):
    task = fresh_task(client, artifacts)
    with pytest.raises(NotFoundError) as err:
        client.embed_texts(["a dog"], "nope")
    assert (err.value.status, err.value.type, err.value.field) == (404, "unknown_task", "task")
    assert "nope" in err.value.message and err.value.body["error"]["field"] == "task"

    with pytest.raises(BadRequestError) as err:
        client.index(task, [{"image": "!!!", "id": "x"}])
    assert (err.value.status, err.value.type) == (422, "invalid_base64")
    assert err.value.field == "items[0].image"
    with pytest.raises(BadRequestError) as err:
        client.embed_images([b"not an image"], task)
    assert (err.value.status, err.value.type, err.value.field) == (
        422,
        "invalid_image",
        "images[0]",
    )
    with pytest.raises(BadRequestError) as err:
        client.search(task, vector=[0.5, 0.5, 0.5])
    assert (err.value.status, err.value.field) == (422, "query.vector")
    with pytest.raises(NotFoundError) as err:
        client.load_task(task, server_path="lpi/missing.safetensors")
    assert err.value.field == "path"
    with pytest.raises(ConflictError) as err:
        client.promote(task, "0123456789abcdef")
    assert (err.value.status, err.value.field) == (409, "version")

    # Keys: none -> 401; the query key on an admin call -> 403; the admin key does both.
    with pytest.raises(AuthError) as err:
        connect(app=app).list_tasks()
    assert err.value.status == 401 and err.value.field == "authorization"
    with pytest.raises(AuthError) as err:
        connect(app=app, api_key=API).unload_task(task)
    assert err.value.status == 403
    admin_only = connect(app=app, admin_key=ADMIN)
    assert admin_only.get_task(task).task == task
    assert admin_only.unload_task(task).task == task


def test_invalid_calls_are_refused_before_sending(client):
    with pytest.raises(ValueError, match="task"):
        client.get_task("Not A Task")
    with pytest.raises(TypeError, match="list"):
        client.embed_texts("one string")
    with pytest.raises(ValueError, match="exactly one"):
        client.search("t", text="a", vector=[1.0])
    with pytest.raises(ValueError, match="server_path"):
        client.load_task("t")
    with pytest.raises(TypeError, match="image"):
        client.embed_images([1.5])


# -- the CLI -------------------------------------------------------------------------------------


@pytest.fixture
def lpi_cli(app, portal, capsys, monkeypatch):
    """lpi_cli(*argv) -> (exit status, parsed stdout or None, stderr), on the in-process app."""
    monkeypatch.setenv("LPI_API_KEY", API)  # the query key from the environment

    def run(*argv: str):
        code = main(["--admin-key", ADMIN, *argv], transport=PortalTransport(app, portal))
        out, err = capsys.readouterr()
        return code, (json.loads(out) if out.strip() else None), err

    return run


def test_cli_tasks_embed_index_search(lpi_cli, tmp_path):
    task = f"t-{uuid.uuid4().hex[:10]}"
    code, loaded, _ = lpi_cli(
        "tasks", "load", task, "--server-path", "lpi/shapes-colours.safetensors"
    )
    assert code == 0 and loaded["changed"]
    code, listed, _ = lpi_cli("tasks", "list")
    assert task in [t["task"] for t in listed["tasks"]]
    assert lpi_cli("tasks", "get", task)[1]["prompt_version"] == loaded["task"]["prompt_version"]

    (tmp_path / "red.png").write_bytes(png((200, 10, 10)))
    code, embedded, _ = lpi_cli(
        "embed", "--task", task, "--text", "a", "--text", "b", "--image", str(tmp_path / "red.png")
    )
    assert code == 0 and len(embedded["text_embeddings"]) == 2
    assert len(embedded["image_embeddings"]) == 1

    lines = [
        {"id": "t1", "text": "a red square", "payload": {"colour": "red"}},
        {"text": "two blue circles", "payload": {"colour": "blue"}},
        {"id": "i1", "image": "red.png"},
        {"id": "t3", "text": "stripes"},
    ]
    (tmp_path / "items.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    code, indexed, _ = lpi_cli(
        "index", "--task", task, str(tmp_path / "items.jsonl"), "--chunk-size", "3", "--no-progress"
    )
    assert code == 0 and indexed["count"] == 4 and indexed["serving"]
    assert indexed["ids"][0] == "t1" and indexed["ids"][2:] == ["i1", "t3"]

    code, found, _ = lpi_cli("search", "--task", task, "--text", "a red square", "--top-k", "2")
    assert code == 0 and found["hits"][0]["id"] == "t1" and len(found["hits"]) == 2
    code, blue, _ = lpi_cli("search", "--task", task, "--text", "x", "--filter", "colour=blue")
    assert [h["payload"]["colour"] for h in blue["hits"]] == ["blue"]
    vector = json.dumps(embedded["text_embeddings"][0])
    assert lpi_cli("search", "--task", task, "--vector-json", vector)[0] == 0
    code, by_image, _ = lpi_cli("search", "--task", task, "--image", str(tmp_path / "red.png"))
    assert by_image["hits"][0]["id"] == "i1"

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(png((10, 200, 10)))
    (folder / "sub" / "b.png").write_bytes(png((10, 10, 200)))
    (folder / "notes.txt").write_text("not an image")
    code, photos, _ = lpi_cli("index", "--task", task, str(folder), "--no-progress")
    assert code == 0 and photos["ids"] == ["a.png", "sub/b.png"]

    code, health, _ = lpi_cli("health")
    assert code == 0 and health["health"]["status"] == "ok" and health["readiness"]["ready"]
    code, gone, _ = lpi_cli("tasks", "unload", task, "--delete-vectors")
    assert code == 0 and gone["vectors_deleted"]


def test_cli_errors_exit_1_with_the_servers_message(lpi_cli, tmp_path):
    code, out, err = lpi_cli("tasks", "get", "nope")
    assert code == 1 and out is None
    assert "404 unknown_task" in err and "'nope' is not loaded" in err and "(field: task)" in err
    code, _, err = lpi_cli("search", "--task", "nope", "--text", "a", "--filter", "oops")
    assert code == 1 and "KEY=VALUE" in err
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    code, _, err = lpi_cli("index", "--task", "t", str(tmp_path / "bad.jsonl"))
    assert code == 1 and "bad.jsonl:2" in err


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["embed"],
        ["index"],
        ["search"],
        ["tasks"],
        ["tasks", "list"],
        ["tasks", "get"],
        ["tasks", "load"],
        ["tasks", "promote"],
        ["tasks", "unload"],
        ["health"],
        ["points"],
        ["points", "count"],
        ["points", "list"],
        ["points", "delete"],
    ],
)
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0 and "usage: lpi" in capsys.readouterr().out


def test_the_sdk_imports_only_httpx_pydantic_and_the_schema():
    """Beyond import-linter's contract: no web framework, no server module (the schema is
    `wire`), and PIL and tqdm only when a PIL image or a progress bar is asked for."""
    code = (
        "import sys, clients, clients.cli\n"
        "heavy = {'torch', 'fastapi', 'starlette', 'lpi', 'kernels', 'export', 'PIL', 'tqdm',"
        " 'numpy', 'qdrant_client'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy"
        " or m == 'server' or m.startswith('server.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
