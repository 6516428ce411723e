"""Property tests (hypothesis): artifact reading, request decoding, payloads and filters never
fail unexpectedly.

Whatever bytes arrive, the answer is a value or our own error (ArtifactError -> 422, RequestError
-> 4xx naming the field): never another exception, which would be a 500. Payloads and filters
go through the real app, against local mode (in memory) and Qdrant Edge: a point /index
accepts is found again by /search.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import uuid

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from export import ArtifactError, read_artifact
from server.errors import refusal_of
from server.exceptions import RequestError
from server.inputs import Limits, decode_base64, open_image, text_rows
from tests.server_helpers import export_artifacts

LIMITS = Limits(
    max_items=8, max_image_pixels=1_000_000, max_text_chars=500, image_size=32, context_length=77
)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def artifact_bytes(tiny_runs, tmp_path_factory) -> bytes:
    files = export_artifacts(tiny_runs, tmp_path_factory.mktemp("artifacts"))
    return files["lpi"][0].read_bytes()


@FAST
@given(data=st.data())
def test_a_damaged_artifact_is_refused_or_reads_the_same_tensors(
    artifact_bytes, tmp_path_factory, data
):
    original = bytearray(artifact_bytes)
    damaged = bytearray(original)
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            at = data.draw(st.integers(0, len(damaged) - 1))
            damaged[at] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        damaged = damaged[: data.draw(st.integers(0, len(damaged) - 1))]
    else:
        at = data.draw(st.integers(0, len(damaged)))
        damaged[at:at] = data.draw(st.binary(min_size=1, max_size=64))
    path = tmp_path_factory.mktemp("damaged") / "task.safetensors"
    path.write_bytes(bytes(damaged))
    reference = read_artifact(_write(tmp_path_factory, artifact_bytes))
    try:
        artifact = read_artifact(path)
    except ArtifactError:
        return
    # Accepted: then only metadata outside the checksum can differ; every tensor is intact.
    for tower in ("image", "text"):
        got, want = getattr(artifact.folded, tower), getattr(reference.folded, tower)
        assert torch.equal(got.key_u, want.key_u) and torch.equal(got.value_m, want.value_m)


def _write(factory, data: bytes):
    path = factory.mktemp("good") / "task.safetensors"
    path.write_bytes(data)
    return path


@FAST
@given(text=st.text(max_size=200))
def test_base64_decoding_returns_bytes_or_names_the_field(text):
    try:
        decoded = decode_base64(text, "images[0]")
    except RequestError as err:
        assert refusal_of(err).status == 422 and err.field == "images[0]"
        return
    assert isinstance(decoded, bytes)


@FAST
@given(blob=st.binary(max_size=64))
def test_base64_round_trips_in_both_alphabets(blob):
    assert decode_base64(base64.b64encode(blob).decode(), "x") == blob
    unpadded = base64.urlsafe_b64encode(blob).decode().rstrip("=")
    assert decode_base64(unpadded, "x") == blob


@FAST
@given(blob=st.binary(max_size=2048))
def test_arbitrary_bytes_are_an_image_or_a_4xx(blob):
    try:
        image = open_image(blob, LIMITS.max_image_pixels, "images[3]")
    except RequestError as err:
        assert 400 <= refusal_of(err).status < 500 and err.field == "images[3]"
        return
    assert image.width * image.height <= LIMITS.max_image_pixels


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    size=st.tuples(st.integers(1, 300), st.integers(1, 300)),
    mode=st.sampled_from(["RGB", "L", "RGBA", "P", "1", "I;16"]),
    fmt=st.sampled_from(["PNG", "GIF", "BMP", "TIFF", "WEBP"]),
    cut=st.integers(0, 200),
)
def test_real_and_truncated_images(size, mode, fmt, cut):
    out = io.BytesIO()
    try:
        Image.new(mode, size).save(out, fmt)
    except (OSError, ValueError, KeyError):  # this format cannot hold this mode
        return
    blob = out.getvalue()
    blob = blob[: max(1, len(blob) - cut)] if cut else blob
    try:
        open_image(blob, LIMITS.max_image_pixels, "images[0]")
    except RequestError as err:
        assert refusal_of(err).status in (413, 422) and err.field == "images[0]"


@FAST
@given(texts=st.lists(st.text(max_size=600), min_size=1, max_size=4))
def test_texts_become_rows_ending_at_end_of_text_or_a_4xx(texts):
    fields = [f"texts[{i}]" for i in range(len(texts))]
    try:
        rows = text_rows(texts, LIMITS, fields)
    except RequestError as err:
        assert refusal_of(err).status in (413, 422) and err.field in fields
        return
    for row in rows:
        assert 2 <= row.shape[0] <= LIMITS.context_length
        assert int(row[-1]) == int(row.max())  # the end-of-text id, the highest, closes it


# -- payloads and filters through the app -------------------------------------------------------

SURROGATES = st.characters(categories=["Cs"])
ODD_TEXT = st.text(st.one_of(st.characters(), SURROGATES, st.sampled_from('."\\[]* ')), max_size=8)
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**63, 2**63 - 1, -(2**63), -(2**63) - 1, 2**53 + 1]),
    st.floats(),  # NaN and the infinities included
    ODD_TEXT,
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ODD_TEXT, inner, max_size=3),
    max_leaves=12,
)
STORABLE = st.one_of(  # what the door takes, drawn often so that searches get checked
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
PAYLOADS = st.one_of(
    st.dictionaries(
        st.text(max_size=8).filter(lambda k: '"' not in k and "\\" not in k), STORABLE, max_size=6
    ),
    st.dictionaries(ODD_TEXT, VALUES, max_size=6),
    st.integers(250, 262).map(lambda n: {f"k{i}": i for i in range(n)}),  # about the key limit
    st.integers(1, 3).map(lambda n: {"long": "x" * (30_000 * n)}),  # about the size limit
    st.sampled_from([[], "text", 3, None]),  # not an object at all
)
STORE_KINDS = [
    "memory",
    pytest.param(
        "edge",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("qdrant_edge") is None, reason="no qdrant-edge-py"
        ),
    ),
]
APP_EXAMPLES = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)


@pytest.fixture(scope="module", params=STORE_KINDS)
def app_client(request, tiny_runs, tmp_path_factory):
    from fastapi.testclient import TestClient

    from tests.server_helpers import create_app
    from tests.server_helpers import settings as server_settings

    inbox = tmp_path_factory.mktemp("inbox")
    artifact = export_artifacts(tiny_runs, inbox)["lpi"][0]
    config = server_settings(tiny_runs, tmp_path_factory.mktemp("data"), inbox, store=request.param)
    with TestClient(create_app(config)) as client:
        loaded = client.put("/tasks/t", json={"path": str(artifact.relative_to(inbox))})
        assert loaded.status_code == 200, loaded.text
        yield client


def post_json(client, path: str, body: dict):
    """json.dumps writes a lone surrogate as its \\u escape and NaN as NaN, as a client might."""
    content = json.dumps(body).encode()
    return client.post(path, content=content, headers={"content-type": "application/json"})


def exact_matches(payload: dict) -> list[tuple[str, object]]:
    """Top-level (key, value) pairs a filter can name exactly."""
    return [(k, v) for k, v in payload.items() if isinstance(v, str | int | bool)]


@APP_EXAMPLES
@given(payload=PAYLOADS, which=st.integers(0, 10))
def test_no_payload_makes_a_5xx_and_a_stored_point_stays_searchable(app_client, payload, which):
    id = f"p{uuid.uuid4().hex}"
    item = {"id": id, "text": "a red circle", "payload": payload}
    indexed = post_json(app_client, "/index", {"task": "t", "items": [item]})
    assert indexed.status_code < 500, indexed.text
    if indexed.status_code != 200:
        error = indexed.json()["error"]
        assert indexed.status_code == 422 and error["field"].startswith("items[0]"), error
        return
    pairs = exact_matches(payload)
    filter = dict([pairs[which % len(pairs)]]) if pairs else None
    found = post_json(
        app_client,
        "/search",
        {"task": "t", "query": {"text": "a red circle"}, "top_k": 1000, "filter": filter},
    )
    assert found.status_code == 200, found.text
    hits = {hit["id"]: hit["payload"] for hit in found.json()["hits"]}
    assert id in hits
    stored = hits[id]
    assert stored.keys() == payload.keys() and all(
        type(stored[k]) is type(v) for k, v in payload.items()
    )


@APP_EXAMPLES
@given(filter=st.dictionaries(ODD_TEXT, LEAVES, max_size=4) | st.sampled_from([[], "x", 1]))
def test_no_filter_makes_a_5xx(app_client, filter):
    found = post_json(
        app_client, "/search", {"task": "t", "query": {"text": "a"}, "filter": filter}
    )
    assert found.status_code < 500, found.text
    if found.status_code != 200:
        assert found.status_code == 422 and found.json()["error"]["field"].startswith("filter")
