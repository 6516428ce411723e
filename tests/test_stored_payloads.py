"""What is stored can never break a search, and every store answers the same, through the app.

Regressions, each once a 500 or a silent change of type: a lone surrogate in a payload (200 at
/index, then every search that met the point a 500, across restarts; with the edge store the
/index itself a 500), a filter integer >= 2**63, a payload integer 2**70 read back as a float,
a query vector scaled by 1e30 scoring every point 0. Each runs against local mode and Qdrant
Edge. Scores are compared with the unscaled query's within 1e-5 (float32 storage).
"""

from __future__ import annotations

import importlib.util
import json
import math
import uuid

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.server_helpers import create_app, export_artifacts, settings

HAS_EDGE = importlib.util.find_spec("qdrant_edge") is not None
STORES = [
    pytest.param("local", id="local"),
    pytest.param(
        "edge", id="edge", marks=pytest.mark.skipif(not HAS_EDGE, reason="no qdrant-edge-py")
    ),
]
SCORE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def inbox(tiny_runs, tmp_path_factory):
    inbox = tmp_path_factory.mktemp("inbox")
    return inbox, export_artifacts(tiny_runs, inbox)["lpi"][0]


def open_app(tiny_runs, inbox, data_dir, store: str) -> TestClient:
    folder, _ = inbox
    return TestClient(create_app(settings(tiny_runs, data_dir, folder, store=store)))


@pytest.fixture(params=STORES)
def client(request, tiny_runs, inbox, tmp_path):
    folder, artifact = inbox
    with open_app(tiny_runs, inbox, tmp_path / "data", request.param) as client:
        loaded = client.put("/tasks/t", json={"path": str(artifact.relative_to(folder))})
        assert loaded.status_code == 200, loaded.text
        yield client


def raw_post(client: TestClient, path: str, body: str):
    """A body as written, so JSON escapes such as \\udfff reach the server unchanged."""
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"})


def index(client, items: list[dict]):
    return client.post("/index", json={"task": "t", "items": items})


def search(client, **body):
    return client.post("/search", json={"task": "t", "query": {"text": "a red circle"}} | body)


def assert_refused(response, field: str) -> None:
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field, response.text


def test_a_lone_surrogate_is_refused_at_the_door_and_search_still_answers(client):
    body = r'{"task": "t", "items": [{"id": "p1", "text": "a", "payload": {"k": "\udfff"}}]}'
    assert_refused(raw_post(client, "/index", body), "items[0].payload.k")
    body = r'{"task": "t", "items": [{"id": "p1", "text": "a", "payload": {"\udfff": 1}}]}'
    refused = raw_post(client, "/index", body)
    assert_refused(refused, "items[0].payload")
    assert r"\udfff" in refused.json()["error"]["message"]  # named, escaped
    body = r'{"task": "t", "items": [{"id": "\udfff", "text": "a"}]}'
    assert_refused(raw_post(client, "/index", body), "items[0].id")
    body = r'{"task": "t", "query": {"text": "a"}, "filter": {"k": "\ud800"}}'
    assert_refused(raw_post(client, "/search", body), "filter.k")
    # a surrogate pair is one character, stored and returned as such
    body = r'{"task": "t", "items": [{"id": "p2", "text": "a", "payload": {"k": "\ud83d\ude00"}}]}'
    assert raw_post(client, "/index", body).status_code == 200
    hits = search(client).json()["hits"]
    assert [(h["id"], h["payload"]) for h in hits] == [("p2", {"k": "😀"})]


def test_integers_keep_their_type_and_filters_stay_within_int64(client):
    payload = {"max": 2**63 - 1, "min": -(2**63), "f": 2.0**70, "s": "9223372036854775808"}
    assert index(client, [{"id": "p1", "text": "a red circle", "payload": payload}]).is_success
    for value, field in [
        (2**63, "items[0].payload.k"),
        (2**70, "items[0].payload.k"),
        (-(2**63) - 1, "items[0].payload.k"),
    ]:
        assert_refused(index(client, [{"text": "a", "payload": {"k": value}}]), field)
    assert_refused(search(client, filter={"big": 2**63}), "filter.big")
    assert_refused(search(client, filter={"big": -(2**63) - 1}), "filter.big")
    assert_refused(search(client, filter={"f": 1.5}), "filter.f")
    (hit,) = search(client).json()["hits"]
    assert [type(hit["payload"][k]) for k in payload] == [int, int, float, str]
    # Qdrant Edge 0.9 returns about a third of floats one ulp off (tests/test_store.py)
    assert math.isclose(hit["payload"].pop("f"), payload.pop("f"), rel_tol=4.5e-16)
    assert hit["payload"] == payload  # the integers exactly
    for filter in ({"max": 2**63 - 1}, {"min": -(2**63)}, {"s": "9223372036854775808"}):
        assert [h["id"] for h in search(client, filter=filter).json()["hits"]] == ["p1"]
    assert search(client, filter={"max": 2**63 - 2}).json()["hits"] == []


def test_keys_are_matched_literally_and_quotes_are_refused(client):
    payload = {"a.b": 1, "k k": "v", "é": True, "a[": 2}
    assert index(client, [{"id": "p1", "text": "a red circle", "payload": payload}]).is_success
    for key, value in payload.items():
        hits = search(client, filter={key: value}).json()["hits"]
        assert [h["id"] for h in hits] == ["p1"], key
    assert_refused(index(client, [{"text": "a", "payload": {'a"b': 1}}]), "items[0].payload")
    assert_refused(index(client, [{"text": "a", "payload": {"a\\b": 1}}]), "items[0].payload")
    assert_refused(search(client, filter={'a"b': 1}), "filter")


def test_a_scaled_query_vector_gives_the_unit_vectors_scores(client):
    texts = ["a red circle", "a blue square", "two green lines", "a yellow dot"]
    assert index(client, [{"id": f"p{i}", "text": t} for i, t in enumerate(texts)]).is_success
    query = client.post("/embed", json={"task": "t", "texts": ["a red square"]})
    vector = np.array(query.json()["text_embeddings"][0])
    unit = search(client, query={"vector": vector.tolist()}).json()["hits"]
    assert len(unit) == 4
    for scale in (1e30, 1e-30, 1e200):
        scaled = search(client, query={"vector": (vector * scale).tolist()})
        assert scaled.status_code == 200, scaled.text
        hits = scaled.json()["hits"]
        assert [h["id"] for h in hits] == [h["id"] for h in unit], scale
        np.testing.assert_allclose(
            [h["score"] for h in hits], [h["score"] for h in unit], atol=SCORE_TOLERANCE
        )


def test_a_point_stored_before_the_rules_is_escaped_not_a_500(tiny_runs, inbox, tmp_path):
    """Local mode stored a lone surrogate and NaN before the door refused them: searches answer
    200, with U+FFFD and null in their place, before and after a restart."""
    folder, artifact = inbox
    data = tmp_path / "data"
    with open_app(tiny_runs, inbox, data, "local") as client:
        client.put("/tasks/t", json={"path": str(artifact.relative_to(folder))})
        assert index(client, [{"id": "p1", "text": "a red circle"}]).is_success
        store = client.app.state.service.store
        entry = next(iter(store._backend.scroll(store._catalog, {"kind": "version"})))
        vector = np.ones((1, store._entry("t", entry["prompt_version"])["dim"]), np.float32)
        legacy = {
            "k": "a\udfffb",
            "nan": float("nan"),
            "task": "t",
            "prompt_version": entry["prompt_version"],
            "id": "old\udfff",
        }
        store._backend.upsert(entry["collection"], [str(uuid.uuid4())], vector, [legacy])
        first = search(client, top_k=5)
    with open_app(tiny_runs, inbox, data, "local") as client:
        second = search(client, top_k=5)
    for response in (first, second):
        assert response.status_code == 200, response.text
        hits = {h["id"]: h["payload"] for h in response.json()["hits"]}
        assert hits["old\ufffd"] == {"k": "a\ufffdb", "nan": None}
        json.dumps(response.json(), allow_nan=False).encode()


def test_a_field_name_no_response_could_carry_is_still_a_json_422(client):
    for path, body in [
        ("/index", r'{"task": "t", "items": [{"text": "a"}], "\udfff": 1}'),
        ("/index", r'{"task": "t", "items": [{"text": "a", "\ud800x": 1}]}'),
        ("/search", r'{"task": "t", "query": {"text": "a", "\udfff": 2}}'),
        ("/embed", r'{"texts": ["\udfff"], "\udfff": 1}'),
    ]:
        response = raw_post(client, path, body)
        assert response.status_code == 422, (path, response.text)
        assert response.json()["error"]["field"], response.text
