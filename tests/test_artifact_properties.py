"""Property tests (hypothesis) of hostile artifacts against one running app (in-process).

Every header field is fuzzed (strings with lone surrogates, long strings, path-like values,
huge and negative numbers, odd types, values that are not JSON), and every tensor's dtype,
rank, shape and values. Whatever arrives: never a 5xx, never a file written or changed
outside the data directory, and never a served vector that is null, non-finite or not unit.
"""

from __future__ import annotations

import base64

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from server.app import create_app
from tests.artifact_edits import (
    ADMIN,
    OCTETS,
    QUERY,
    artifact_bytes,
    files_outside,
    is_unit_vector_list,
    read_raw,
    seal,
)
from tests.server_helpers import export_artifacts, png_bytes
from tests.server_helpers import settings as base_settings

BOUNDED = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
IMAGE = base64.b64encode(png_bytes(3)).decode()


@pytest.fixture(scope="module")
def served(tiny_runs, tmp_path_factory):
    """(client, base artifact's header and tensors, root, data dir): one app for every
    example, with a task 'base' loaded so that task='auto' has keys to route by."""
    root = tmp_path_factory.mktemp("root")
    data, inbox = root / "data", root / "inbox"
    files = export_artifacts(tiny_runs, root / "exported")["lpi"]
    inbox.mkdir()
    (inbox / "loop").symlink_to(inbox / "loop")
    (inbox / "out").symlink_to(root / "exported")
    config = base_settings(tiny_runs, data, inbox, admin_key="admin-secret", api_key="query-secret")
    with TestClient(create_app(config)) as client:
        base = client.put("/tasks/base", content=files[1].read_bytes(), headers=ADMIN | OCTETS)
        assert base.status_code == 200, base.text
        yield client, read_raw(files[0]), root, data


def sentinel_paths(root) -> st.SearchStrategy[str]:
    climbs = st.integers(0, 12).map(lambda n: "../" * n + "escaped/x")
    return st.one_of(
        climbs,
        st.just(str(root / "absolute" / "x")),
        st.just("/"),
        st.just("a/" * 200),
        st.just("x\x00y"),
        st.just("."),
    )


SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
TEXT = st.text(alphabet=st.one_of(st.characters(), SURROGATE), max_size=24)
LONG = st.integers(257, 50_000).map(lambda n: "v" * n)
NUMBER = st.one_of(
    st.integers(-(2**80), 2**80), st.floats(allow_nan=True, allow_infinity=True), st.booleans()
)
ODD = st.one_of(
    st.none(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), TEXT, max_size=3),
)
NOT_JSON = st.sampled_from(["1" * 5000, "[" * 5000, "{", "NaN", "", '"open', "tru"])


def header_values(root) -> st.SearchStrategy:
    return st.one_of(TEXT, LONG, sentinel_paths(root), NUMBER, ODD)


@BOUNDED
@given(data=st.data())
def test_fuzzed_headers_never_5xx_nor_write_outside_nor_serve_bad_vectors(served, data):
    client, (meta, tensors), root, data_dir = served
    before = files_outside(root, data_dir)
    header = seal(meta, tensors)
    raw = {}
    names = [*sorted(header), "extra", "../field", "prompt_version", "prompt_version"]
    for name in data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3)):
        if data.draw(st.integers(0, 5)) == 0:
            raw[name] = data.draw(NOT_JSON, label="raw value")
        else:
            header[name] = data.draw(header_values(root), label=name)
    body = artifact_bytes(header, tensors, raw)
    check_load_and_serve(client, body)
    assert files_outside(root, data_dir) == before


DTYPES = st.sampled_from(
    [
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int64,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.float8_e4m3fn,
        torch.complex64,
    ]
)
NEW_NAMES = st.sampled_from(["keys.other", "image.extra", "train.new", "keys.image", "text.key_u"])


def fuzz_tensor(data, tensor: torch.Tensor) -> torch.Tensor:
    kind = data.draw(st.sampled_from(["dtype", "rank", "shape", "scale", "special", "fill"]))
    if kind == "dtype":
        return tensor.to(data.draw(DTYPES))
    if kind == "rank":
        return data.draw(
            st.sampled_from(
                [tensor.flatten()[0], tensor.flatten(), tensor[None], tensor.reshape(-1, 1)]
            )
        )
    if kind == "shape":
        dims = data.draw(st.lists(st.integers(0, 9), min_size=0, max_size=4), label="shape")
        return torch.randn(dims, generator=torch.Generator().manual_seed(len(dims)))
    if kind == "scale":
        return tensor * 10.0 ** data.draw(st.integers(-45, 45), label="exponent")
    out = tensor.clone().float()
    if kind == "special" and out.numel():
        at = data.draw(st.integers(0, out.numel() - 1))
        out.view(-1)[at] = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        return out
    return torch.full_like(out, data.draw(st.sampled_from([0.0, 1.0, -3.0, 1e-30])))


@BOUNDED
@given(data=st.data())
def test_fuzzed_tensors_never_5xx_nor_serve_bad_vectors(served, data):
    client, (meta, tensors), root, data_dir = served
    before = files_outside(root, data_dir)
    edited = dict(tensors)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        action = data.draw(st.sampled_from(["change", "change", "drop", "add"]))
        if action == "add":
            edited[data.draw(NEW_NAMES)] = torch.randn(5, 64)
            continue
        name = data.draw(st.sampled_from(sorted(edited)), label="tensor")
        if action == "drop":
            edited.pop(name)
        else:
            edited[name] = fuzz_tensor(data, edited[name])
    header = seal(meta, edited) if data.draw(st.integers(0, 4)) else meta
    check_load_and_serve(client, artifact_bytes(header, edited))
    assert files_outside(root, data_dir) == before


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.one_of(TEXT, st.just("loop"), st.just("out"), st.just("loop/x")))
def test_fuzzed_artifact_paths_are_a_4xx_naming_path(served, path):
    client, _, root, data_dir = served
    before = files_outside(root, data_dir)
    try:
        answer = client.put("/tasks/p", json={"path": path}, headers=ADMIN)
        event(f"load: {answer.status_code}")
    except UnicodeEncodeError:  # the client cannot send a lone surrogate as JSON
        return
    assert 400 <= answer.status_code < 500, answer.text
    assert answer.json()["error"]["field"] in ("path", "body"), answer.text
    assert files_outside(root, data_dir) == before


def check_load_and_serve(client, body: bytes) -> None:
    answer = client.put("/tasks/fuzz", content=body, headers=ADMIN | OCTETS)
    event(f"load: {answer.status_code}")  # --hypothesis-show-statistics: how many got served
    assert answer.status_code < 500, answer.text
    if answer.status_code != 200:
        assert answer.json()["error"]["field"], answer.text
        return
    try:
        for task in ("fuzz", "auto"):
            request = {"task": task, "texts": ["a red square"], "images": [IMAGE]}
            served = client.post("/embed", headers=QUERY, json=request)
            event(f"embed {task}: {served.status_code}")
            assert served.status_code < 500, served.text
            if served.status_code == 200:
                body = served.json()
                assert is_unit_vector_list(body["text_embeddings"]), body
                assert is_unit_vector_list(body["image_embeddings"]), body
        info = client.get("/tasks/fuzz", headers=QUERY)
        assert info.status_code == 200, info.text
    finally:
        client.delete("/tasks/fuzz", params={"delete_vectors": True}, headers=ADMIN)
