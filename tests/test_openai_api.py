"""The OpenAI-compatible API (`/v1/embeddings`, `/v1/models`) driven by the official `openai`
client over a real socket, against /embed of the same server; and images as data URIs (equal
to plain base64) or URLs (refused, never fetched) wherever the API takes base64."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

import lpi
from export.tasks import export_run
from server.app import create_app
from server.settings import Settings
from tests.server_helpers import cosines, png_bytes, serve_on_socket
from wire.openai import BARE_MODEL

API = "query-key"
# The same rows through the same batcher and model: only float32 summation order can differ
# (batches of other sizes), far below 1e-4 in cosine.
SAME = 0.9999


@pytest.fixture(scope="module")
def server(tiny_runs, tmp_path_factory):
    """A server on a loopback socket with the LPI run's tasks loaded; (url, task names)."""
    backbone = lpi.load_backbone(tiny_runs / "backbone.safetensors")
    inbox = tmp_path_factory.mktemp("inbox")
    artifacts = export_run(tiny_runs / "lpi", backbone, inbox)
    settings = Settings(
        backbone=str(tiny_runs / "backbone.safetensors"),
        data_dir=tmp_path_factory.mktemp("d"),
        artifact_dir=inbox,
        store="memory",
        api_key=API,
    )
    with serve_on_socket(create_app(settings)) as url:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API}"}) as http:
            for artifact in artifacts:
                path = artifact.path.relative_to(inbox).as_posix()
                http.put(f"/tasks/{artifact.task_id}", json={"path": path}).raise_for_status()
        yield url, [a.task_id for a in artifacts]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {API}"}) as client:
        yield client


@pytest.fixture(scope="module")
def oai(server):
    client = openai.OpenAI(base_url=server[0] + "/v1", api_key=API, max_retries=0)
    yield client
    client.close()


def _embed(http, task, texts=(), images=()) -> dict:
    answer = http.post("/embed", json={"task": task, "texts": list(texts), "images": list(images)})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_openai_client_embeddings_equal_embed(server, http, oai):
    rng = np.random.default_rng()
    words = ["red", "blue", "circle", "square", "a photo of", "small", "green", "shape"]
    texts = [" ".join(rng.choice(words, size=3)) for _ in range(5)]
    for task in server[1]:
        want = _embed(http, task, texts)["text_embeddings"]
        got = oai.embeddings.create(model=task, input=texts)  # the client asks for base64
        assert [row.index for row in got.data] == list(range(len(texts)))
        assert got.model == task and got.usage.prompt_tokens == got.usage.total_tokens > 0
        assert cosines([row.embedding for row in got.data], want).min() >= SAME
        floats = oai.embeddings.create(model=task, input=texts[0], encoding_format="float")
        assert len(floats.data) == 1 and cosines([floats.data[0].embedding], want[:1]) >= SAME
    bare = oai.embeddings.create(model=BARE_MODEL, input=texts)
    want = _embed(http, None, texts)["text_embeddings"]
    assert cosines([row.embedding for row in bare.data], want).min() >= SAME


def test_usage_counts_clip_tokens(server, oai):
    texts = ["a red circle", "two small blue squares on grass"]
    answer = oai.embeddings.create(model=server[1][0], input=texts)
    tokens = sum(len(ids) for ids in lpi.tokenizer.token_ids(texts, 77))
    assert answer.usage.prompt_tokens == tokens


def test_models_list_what_tasks_lists(server, http, oai):
    tasks = {t["task"] for t in http.get("/tasks").json()["tasks"]}
    ids = [model.id for model in oai.models.list()]
    assert set(ids) == tasks | {BARE_MODEL} and len(ids) == len(tasks) + 1
    assert tasks == set(server[1])


def test_images_extension_and_data_uris_equal_plain_base64(server, http, oai):
    task = server[1][0]
    blobs = [png_bytes(int(seed)) for seed in np.random.default_rng().integers(0, 10**6, 2)]
    plain = [base64.b64encode(b).decode() for b in blobs]
    uris = ["data:image/png;base64," + p for p in plain]
    want = _embed(http, task, images=plain)["image_embeddings"]
    assert cosines(_embed(http, task, images=uris)["image_embeddings"], want).min() >= SAME
    got = oai.embeddings.create(model=task, input="a shape", extra_body={"images": uris})
    assert len(got.data) == 3 and got.data[0].index == 0 and got.data[2].index == 2
    assert cosines([row.embedding for row in got.data[1:]], want).min() >= SAME
    search = {"task": task, "top_k": 1}
    for image in (plain[0], uris[0]):  # a search query takes a data URI too
        answer = http.post("/search", json=search | {"query": {"image": image}})
        assert answer.status_code in (200, 409), answer.text  # 409: nothing indexed yet


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"model": "no-such-task", "input": "x"}, 404, "model", "model_not_found"),
        ({"model": "Not A Task!", "input": "x"}, 404, "model", "model_not_found"),
        ({"model": "T", "input": []}, 422, "input", "invalid_request"),
        ({"model": "T", "input": ""}, 422, "input", "invalid_request"),
        ({"model": "T", "input": "x", "dimensions": 7}, 422, "dimensions", "invalid_request"),
        ({"model": "T", "input": [101, 2023]}, 422, "input", "invalid_request"),
        ({"model": "T", "input": [[101, 2023]]}, 422, "input", "invalid_request"),
        ({"model": "T", "input": "x", "encoding_format": "int8"}, 422, "encoding_format", None),
        (
            {"model": "T", "input": "x", "images": ["https://example.com/a.png"]},
            422,
            "images[0]",
            "invalid_base64",
        ),
        ({"model": "T", "input": "x", "colour": 1}, 422, "colour", "invalid_request"),
    ],
)
def test_bad_requests_get_openai_error_bodies(server, http, body, status, param, code):
    body = body | ({"model": server[1][0]} if body["model"] == "T" else {})
    answer = http.post("/v1/embeddings", json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert code is None or error["code"] == code
    if "dimensions" in body:
        assert "no truncation" in error["message"]
    if isinstance(body["input"], list) and body["input"] and not isinstance(body["input"][0], str):
        assert "token arrays are not supported" in error["message"]
    if "images" in body:
        assert "URLs are never fetched: send the bytes" in error["message"]


def test_openai_client_raises_its_own_errors(server, oai):
    with pytest.raises(openai.NotFoundError) as missing:
        oai.embeddings.create(model="no-such-task", input="x")
    assert missing.value.body["param"] == "model"
    with pytest.raises(openai.UnprocessableEntityError):
        oai.embeddings.create(model=server[1][0], input="x", dimensions=3)
    keyless = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        keyless.models.list()
    assert denied.value.body["type"] == "permission_error"


def test_urls_are_never_fetched_anywhere(server, http):
    task, url = server[1][0], "http://127.0.0.1:9/never.png"
    cases = [
        ("/embed", {"images": [url]}, "images[0]"),
        ("/index", {"task": task, "items": [{"image": url}]}, "items[0].image"),
        ("/search", {"task": task, "query": {"image": url}}, "query.image"),
    ]
    for path, body, field in cases:
        answer = http.post(path, json=body)
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error["field"] == field
        assert "URLs are never fetched: send the bytes" in error["message"]
    bad_uri = http.post("/embed", json={"images": ["data:image/png,%89PNG"]})
    assert bad_uri.status_code == 422 and "must be base64" in bad_uri.json()["error"]["message"]
