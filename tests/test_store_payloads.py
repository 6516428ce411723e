"""The store's contract at the edges of JSON and of float32, on every implementation and layout.

Both stores must answer the same request alike: payload integers past int64, lone surrogates,
NaN and quote-bearing keys are refused by both (Qdrant Edge once turned 2**70 into a float and
failed outright on a surrogate, while local mode stored them and broke the next response); a
filter names a top-level key literally; vectors are normalised in float64 before float32
storage, so a scale of 1e30 changes no score. Scores within 1e-5 of numpy's float64 cosines
(float32 storage of unit vectors).
"""

from __future__ import annotations

import json
import math
import uuid

import numpy as np
import pytest

from server.store import InvalidInputError, QdrantStore
from tests.test_store import (
    ALL,
    HAS_EDGE,
    KINDS,
    SCORE_TOLERANCE,
    D,
    cosine,
    kind_param,
    open_store,
    unit,
)


@pytest.fixture
def store(request, tmp_path):
    """The parametrised kind of store, in a fresh data directory."""
    opened = open_store(request.param, tmp_path / "data")
    yield opened
    opened.close()


@pytest.mark.parametrize("store", ALL, indirect=True)
def test_scale_of_a_vector_changes_no_score(store):
    """Cosine ignores scale: rows and queries scaled by 1e30 or 1e-30 (whose squares overflow or
    underflow float32) give numpy's float64 cosines, as unit vectors do."""
    rng = np.random.default_rng(9)
    vectors = rng.standard_normal((20, D))
    store.ensure_task("coco", D, "v1")
    ids = [f"p{i}" for i in range(20)]
    scales = np.array([1e30, 1e-30, 1.0, 3e38, 1e-300] * 4)[:, None]  # [20, 1]
    store.upsert("coco", "v1", ids, vectors * scales)
    for scale in (1e30, 1e-30, 1e300, 1.0):
        query = rng.standard_normal(D)
        hits = store.search("coco", "v1", query * scale, top_k=5)
        expected = np.sort(cosine(query, vectors))[::-1][:5]
        np.testing.assert_allclose([hit.score for hit in hits], expected, atol=SCORE_TOLERANCE)
        assert [hit.id for hit in hits] == [ids[i] for i in np.argsort(-cosine(query, vectors))[:5]]


@pytest.mark.parametrize("store", ALL, indirect=True)
def test_payload_values_come_back_with_their_types_and_filter_exactly(store):
    """int64's ends stay integers (Qdrant Edge once read 2**70 back as a float), big floats
    stay floats, and a filter names a top-level key literally, dots and spaces included."""
    rng = np.random.default_rng(10)
    vectors = unit(rng, 6)
    payloads = [
        {"n": 2**63 - 1, "f": 1.2e21, "s": "é\u2028😀", "a.b": 1},
        {"n": -(2**63), "f": -0.0, "k k": True, "": "empty key"},
        {"n": 0, "f": 1e-300, "a[": "x", "nested": {"list": [1, "two", None, {"deep": 2**62}]}},
        {"n": 2**53 + 1, "a.b": 2, "a": {"b": 1}},
        {"n": -1, "é": "é"},
        {},
    ]
    store.ensure_task("coco", D, "v1")
    ids = [f"p{i}" for i in range(6)]
    store.upsert("coco", "v1", ids, vectors, payloads)
    for i, want in enumerate(payloads):
        (hit,) = store.search("coco", "v1", vectors[i], top_k=1)
        assert hit.id == ids[i] and hit.payload == want
        for key, value in want.items():  # same types too: 1.2e21 != int, 2**63 - 1 exact
            assert type(hit.payload[key]) is type(value), key
    query = rng.standard_normal(D)
    for filter, rows in [
        ({"n": 2**63 - 1}, [0]),
        ({"n": -(2**63)}, [1]),
        ({"n": 2**53 + 1}, [3]),  # not rounded through a float
        ({"n": 2**53}, []),
        ({"a.b": 1}, [0]),  # the key "a.b", not "b" inside "a"
        ({"a.b": 2}, [3]),
        ({"k k": True}, [1]),
        ({"a[": "x"}, [2]),
        ({"é": "é"}, [4]),
        ({"s": "é\u2028😀"}, [0]),
        ({"nested": 1}, []),
    ]:
        hits = store.search("coco", "v1", query, top_k=6, filter=filter)
        assert sorted(hit.id for hit in hits) == [ids[i] for i in rows], filter


@pytest.mark.parametrize("store", ALL, indirect=True)
def test_nesting_is_bounded(store):
    store.ensure_task("coco", D, "v1")
    deep: object = 1
    for _ in range(32):
        deep = [deep]
    store.upsert("coco", "v1", ["ok"], unit(np.random.default_rng(11), 1), [{"x": deep}])
    with pytest.raises(InvalidInputError, match="deeper than 32"):
        store.upsert("coco", "v1", ["no"], unit(np.random.default_rng(12), 1), [{"x": [deep]}])
    assert store.count("coco", "v1") == 1


@pytest.mark.parametrize(
    "store", [kind_param(k) for k in KINDS if KINDS[k][0] == "qdrant"], indirect=True
)
def test_a_stored_value_json_cannot_carry_comes_back_escaped(store):
    """Points written before the payload rules (local mode stored lone surrogates and NaN; Qdrant
    Edge never could): a search escapes them instead of failing to answer."""
    store.ensure_task("coco", D, "v1")
    entry = store._entry("coco", "v1")
    vector = unit(np.random.default_rng(13), 1)
    old = {
        "s": "a\udfffb",
        "\udc80": 1,
        "nan": float("nan"),
        "list": [float("inf"), "\ud800"],
        "task": "coco",
        "prompt_version": "v1",
        "id": "p\udfff",
    }
    store._backend.upsert(
        entry["collection"], [str(uuid.uuid4())], vector.astype(np.float32), [old]
    )
    (hit,) = store.search("coco", "v1", vector[0], top_k=1)
    assert hit.id == "p\ufffd"
    assert hit.payload == {"s": "a\ufffdb", "\ufffd": 1, "nan": None, "list": [None, "\ufffd"]}
    json.dumps(hit.payload, allow_nan=False).encode()  # what a response does with it


def assert_same_json(got, want) -> None:
    """Equal, types included; floats within 2 ulp: Qdrant Edge 0.9 returns about a third of
    payload floats one ulp off (its JSON float parsing does not round-trip; measured on 300
    random floats), while local mode returns them exactly."""
    assert type(got) is type(want), (got, want)
    if isinstance(want, float):
        assert math.isclose(got, want, rel_tol=4.5e-16), (got, want)
    elif isinstance(want, dict):
        assert list(got) == list(want), (got, want)
        for key in want:
            assert_same_json(got[key], want[key])
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), (got, want)
        for g, w in zip(got, want, strict=True):
            assert_same_json(g, w)
    else:
        assert got == want


@pytest.mark.skipif(not HAS_EDGE, reason="qdrant-edge-py is not installed")
def test_edge_and_local_mode_answer_odd_requests_alike(tmp_path):
    """The same requests at the edges of JSON get the same answer, value or error, from both."""
    from server.store import EdgeStore

    rng = np.random.default_rng(14)
    vectors = unit(rng, 4)
    requests = [
        ("upsert", (["a"], vectors[:1], [{"big": 2**70}])),
        ("upsert", (["b"], vectors[1:2], [{"s": "\udfff"}])),
        ("upsert", (["c"], vectors[2:3], [{"n": 2**63 - 1, "f": 2.0**70, "a.b": "dot"}])),
        ("upsert", (["d"], vectors[3:] * 1e30, [{"n": -5}])),
        ("search", (vectors[2] * 1e30, 4, None)),
        ("search", (vectors[3], 4, {"big": 2**63})),
        ("search", (vectors[3], 4, {"n": 2**63 - 1})),
        ("search", (vectors[3], 4, {"a.b": "dot"})),
        ("search", (vectors[3], 4, {"s": "\udfff"})),
        ("search", (vectors[3], 4, {"f": 2.0**70})),
        ("search", (vectors[3] * 1e-30, 4, {"n": -5})),
    ]

    def answers(target) -> list:
        target.ensure_task("coco", D, "v1")
        out = []
        for method, args in requests:
            try:
                if method == "upsert":
                    result = target.upsert("coco", "v1", *args)
                else:
                    hits = target.search("coco", "v1", *args)
                    result = [(h.id, round(h.score, 5), h.payload) for h in hits]
            except InvalidInputError as error:
                result = ("refused", str(error))
            out.append(result)
        return out

    with QdrantStore(location=":memory:") as local:
        expected = answers(local)
    with EdgeStore(tmp_path / "edge", search_threads=1, index_threads=1) as edge:
        assert_same_json(answers(edge), expected)
    assert [answer[0] for answer in expected[:2]] == ["refused", "refused"]
    assert expected[4][0][:2] == ("c", 1.0) and expected[6] == [
        ("c", expected[6][0][1], {"n": 2**63 - 1, "f": 2.0**70, "a.b": "dot"})
    ]
