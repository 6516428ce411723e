"""The store's contract, run against every implementation and layout.

Vectors are fresh random unit vectors; scores are checked against numpy's cosine within 1e-5
(Qdrant stores float32 and normalises on write: about 1e-7 of rounding). Edge parity: the same
data in local mode and in Qdrant Edge gives the same top-k and scores.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("qdrant_client")

from server.store import (
    ConflictError,
    Hit,
    InvalidInputError,
    QdrantStore,
    StoreError,
    UnknownTaskError,
    UnknownVersionError,
    VectorStore,
)

ROOT = Path(__file__).resolve().parents[1]
HAS_EDGE = importlib.util.find_spec("qdrant_edge") is not None
SCORE_TOLERANCE = 1e-5  # float32 storage of normalised vectors
D = 16

# kind -> (backend, layout, on disk)
KINDS = {
    "local-memory": ("qdrant", "collection-per-task", False),
    "local-disk": ("qdrant", "collection-per-task", True),
    "local-tenant": ("qdrant", "tenant", True),
    "edge": ("edge", "collection-per-task", True),
    "edge-tenant": ("edge", "tenant", True),
}


def open_store(kind: str, path: Path, layout: str | None = None) -> VectorStore:
    backend, default_layout, on_disk = KINDS[kind]
    layout = layout or default_layout
    if backend == "edge":
        from server.store import EdgeStore

        return EdgeStore(path, layout=layout, search_threads=1, index_threads=1)
    if on_disk:
        return QdrantStore(path, layout=layout)
    return QdrantStore(location=":memory:", layout=layout)


def kind_param(kind: str):
    marks = [pytest.mark.skipif(not HAS_EDGE, reason="qdrant-edge-py is not installed")]
    return pytest.param(kind, id=kind, marks=marks if KINDS[kind][0] == "edge" else ())


ALL = [kind_param(kind) for kind in KINDS]
ON_DISK = [kind_param(kind) for kind in KINDS if KINDS[kind][2]]


@pytest.fixture
def opener(request, tmp_path) -> Callable[..., VectorStore]:
    """Opens the parametrised kind of store at one data directory; closes what it opened."""
    opened: list[VectorStore] = []

    def open_(layout: str | None = None) -> VectorStore:
        opened.append(open_store(request.param, tmp_path / "data", layout))
        return opened[-1]

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def store(opener) -> VectorStore:
    return opener()


def unit(rng: np.random.Generator, n: int, d: int = D) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (b @ a) / (np.linalg.norm(b, axis=-1) * np.linalg.norm(a))


def fill(store: VectorStore, task: str, version: str, vectors: np.ndarray, **payload) -> list[str]:
    store.ensure_task(task, vectors.shape[1], version)
    ids = [f"{task}-{version}-{i}" for i in range(len(vectors))]
    payloads = [
        {"i": i, "even": i % 2 == 0, "group": f"g{i % 3}", **payload} for i in range(len(ids))
    ]
    assert store.upsert(task, version, ids, vectors, payloads) == ids
    return ids


@pytest.mark.parametrize("opener", ALL, indirect=True)
def test_round_trip_exact_top1_cosine_scores_and_ids(store):
    rng = np.random.default_rng(0)
    vectors = unit(rng, 60)  # [60, D]
    ids = fill(store, "coco", "v1", vectors)
    assert isinstance(store, VectorStore)
    assert store.count("coco", "v1") == 60
    assert store.serving_version("coco") == "v1" and store.versions("coco") == ["v1"]
    for row in rng.choice(60, size=6, replace=False):
        hits = store.search("coco", "v1", vectors[row], top_k=5)
        assert [type(hit) for hit in hits] == [Hit] * 5
        assert hits[0].id == ids[row]
        assert hits[0].payload == {"i": int(row), "even": row % 2 == 0, "group": f"g{row % 3}"}
        expected = cosine(vectors[row], vectors[[int(hit.id.rsplit("-", 1)[1]) for hit in hits]])
        np.testing.assert_allclose([hit.score for hit in hits], expected, atol=SCORE_TOLERANCE)
        best = np.sort(cosine(vectors[row], vectors))[::-1][:5]  # exact search at this size
        np.testing.assert_allclose([hit.score for hit in hits], best, atol=SCORE_TOLERANCE)
        assert all(hit.version == "v1" for hit in hits)
    # a query that is not a stored vector, not unit norm, as a plain list
    query = rng.standard_normal(D) * 3
    top = store.search("coco", "v1", query.tolist(), top_k=3)
    np.testing.assert_allclose(
        [hit.score for hit in top], np.sort(cosine(query, vectors))[::-1][:3], atol=SCORE_TOLERANCE
    )
    # ids=None: the store makes uuid4 ids and returns them
    made = store.upsert("coco", "v1", None, unit(rng, 2))
    assert [str(uuid.UUID(id)) for id in made] == made
    assert store.count("coco", "v1") == 62


@pytest.mark.parametrize("opener", ALL, indirect=True)
def test_payload_filter_is_exact_match(store):
    rng = np.random.default_rng(1)
    vectors = unit(rng, 40)
    ids = fill(store, "coco", "v1", vectors)
    query = rng.standard_normal(D)
    for filter, keep in [
        ({"even": True}, lambda i: i % 2 == 0),
        ({"group": "g1"}, lambda i: i % 3 == 1),
        ({"group": "g2", "even": False}, lambda i: i % 3 == 2 and i % 2 == 1),
        ({"i": 7}, lambda i: i == 7),
        ({"group": "nowhere"}, lambda i: False),
        ({"even": 1}, lambda i: False),  # types must match: 1 is not True
        ({"i": True}, lambda i: False),
    ]:
        rows = [i for i in range(40) if keep(i)]
        hits = store.search("coco", "v1", query, top_k=5, filter=filter)
        expected = sorted(rows, key=lambda i: -cosine(query, vectors[i]))[:5]
        assert [hit.id for hit in hits] == [ids[i] for i in expected], filter


@pytest.mark.parametrize("opener", ALL, indirect=True)
def test_versions_are_isolated_and_promotion_switches_the_serving_version(store):
    rng = np.random.default_rng(2)
    old, new = unit(rng, 30), unit(rng, 30)
    old_ids = fill(store, "coco", "v1", old)
    fill(store, "other", "v1", unit(rng, 10))  # another task with the same version name
    store.ensure_task("coco", D, "v2")
    assert store.serving_version("coco") == "v1"  # a new version does not serve by itself
    assert store.count("coco", "v2") == 0
    assert store.search("coco", "v2", old[0], top_k=5) == []
    same_ids = [id for id in old_ids]  # the same caller ids, other vectors
    store.upsert("coco", "v2", same_ids, new)
    for row in range(5):
        hits = store.search("coco", "v2", old[row], top_k=30)
        assert {hit.version for hit in hits} == {"v2"}
        scores = {hit.id: hit.score for hit in hits}
        for i, id in enumerate(same_ids):  # every score is against the v2 vector
            assert abs(scores[id] - cosine(old[row], new[i : i + 1])[0]) < SCORE_TOLERANCE
    assert store.search("coco", "v1", old[3], top_k=1)[0].score > 1 - SCORE_TOLERANCE
    assert len(store.search("coco", "v1", old[3], top_k=100)) == 30  # no other task's points

    store.promote("coco", "v2")
    assert store.serving_version("coco") == "v2"
    if store.layout == "collection-per-task":  # the Qdrant alias itself moved
        assert store._backend.alias_target("lpi_coco") == "lpi_coco@v2"
    assert store.search("coco", "v1", old[3], top_k=1)[0].id == old_ids[3]  # old still there
    assert store.versions("coco") == ["v1", "v2"]

    with pytest.raises(UnknownVersionError, match="accept the mismatch"):
        store.search("coco", "v3", old[0])
    hits = store.search("coco", "v3", new[4], top_k=1, accept_mismatch=True)
    assert hits[0].id == same_ids[4] and hits[0].version == "v2"  # the serving version's

    with pytest.raises(ConflictError, match="promote another"):
        store.delete_version("coco", "v2")
    store.delete_version("coco", "v1")
    with pytest.raises(UnknownVersionError):
        store.search("coco", "v1", old[0])
    assert store.versions("coco") == ["v2"] and store.count("coco", "v2") == 30
    assert store.count("other", "v1") == 10


@pytest.mark.parametrize("opener", ALL, indirect=True)
def test_reupsert_of_an_id_replaces_its_vector_and_payload(store):
    rng = np.random.default_rng(3)
    vectors = unit(rng, 20)
    ids = fill(store, "coco", "v1", vectors)
    replacement = unit(rng, 1)
    assert store.upsert("coco", "v1", [ids[5]], replacement, [{"note": "new"}]) == [ids[5]]
    assert store.count("coco", "v1") == 20
    hit = store.search("coco", "v1", replacement[0], top_k=1)[0]
    assert (hit.id, hit.payload) == (ids[5], {"note": "new"})
    assert hit.score > 1 - SCORE_TOLERANCE
    assert all(hit.id != ids[5] for hit in store.search("coco", "v1", vectors[5], top_k=2)[:1])


@pytest.mark.parametrize("opener", ALL, indirect=True)
def test_delete_task_with_and_without_keeping_vectors(store):
    rng = np.random.default_rng(4)
    vectors = unit(rng, 25)
    fill(store, "keep", "v1", vectors)
    fill(store, "drop", "v1", vectors)
    store.ensure_task("drop", D, "v2")

    store.delete_task("drop")
    store.delete_task("keep", keep_vectors=True)
    for task in ("drop", "keep"):
        for method, args in [
            (store.search, (task, "v1", vectors[0])),
            (store.count, (task, "v1")),
            (store.serving_version, (task,)),
            (store.versions, (task,)),
            (store.delete_task, (task,)),
        ]:
            with pytest.raises(UnknownTaskError, match=repr(task)):
                method(*args)

    store.ensure_task("drop", D, "v1")
    assert store.count("drop", "v1") == 0 and store.versions("drop") == ["v1"]
    store.ensure_task("keep", D, "v1")  # the kept vectors come back
    assert store.count("keep", "v1") == 25
    assert store.search("keep", "v1", vectors[7], top_k=1)[0].id == "keep-v1-7"
    assert store.serving_version("keep") == "v1"


@pytest.mark.parametrize("opener", ALL, indirect=True)
def test_bad_input_raises_clear_errors(store):
    rng = np.random.default_rng(5)
    vectors = unit(rng, 4)
    ids = fill(store, "coco", "v1", vectors)
    ok = vectors[0]
    bad_vectors = [
        (unit(rng, 2, D + 1), r"expected shape \[B, 16\], got \[2, 17\]"),
        (np.zeros((0, D)), "empty batch"),
        (np.where(np.arange(D) == 3, np.nan, vectors[:2]), "row 0 is not finite"),
        (np.vstack([vectors[0], np.full(D, np.inf)]), "row 1 is not finite"),
        (np.zeros((1, D)), "row 0 has norm 0"),
        (vectors[0], r"expected shape \[B, 16\]"),
        ([["a"] * D], "not a numeric array"),
    ]
    for vectors_, message in bad_vectors:
        with pytest.raises(InvalidInputError, match=message):
            store.upsert("coco", "v1", None, vectors_)
    for vector, message in [
        (ok[:-1], r"vector: expected shape \[16\], got \[15\]"),
        (ok[None], r"expected shape \[16\], got \[1, 16\]"),
        (np.where(np.arange(D) == 0, np.inf, ok), "vector: row 0 is not finite"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            store.search("coco", "v1", vector)
    for top_k in (0, -1, 1.5, True, "3"):
        with pytest.raises(InvalidInputError, match="top_k"):
            store.search("coco", "v1", ok, top_k=top_k)
    one = ok[None]  # [1, D]
    for method, args, error, message in [
        (store.upsert, ("coco", "v1", ids[:1], vectors[:2]), InvalidInputError, "1 ids for 2"),
        (store.upsert, ("coco", "v1", ["a", "a"], vectors[:2]), InvalidInputError, "more than"),
        (store.upsert, ("coco", "v1", [], []), InvalidInputError, "empty batch"),
        (store.upsert, ("coco", "v1", ["", "b"], vectors[:2]), InvalidInputError, r"ids\[0\]"),
        (store.upsert, ("coco", "v1", "ab", vectors[:2]), InvalidInputError, "sequence"),
        (store.upsert, ("coco", "v1", None, one, [{"task": 1}]), InvalidInputError, "reserved"),
        (store.upsert, ("coco", "v1", None, one, [{"x": object()}]), InvalidInputError, "JSON"),
        (
            store.upsert,
            ("coco", "v1", None, one, [{"x": 2**63}]),
            InvalidInputError,
            r"payloads\[0\].x: the integer 9223372036854775808 is outside int64",
        ),
        (
            store.upsert,
            ("coco", "v1", None, one, [{"x": [{"y": -(2**63) - 1}]}]),
            InvalidInputError,
            r"payloads\[0\].x\[0\].y: the integer",
        ),
        (
            store.upsert,
            ("coco", "v1", None, one, [{"x": "\udfff"}]),
            InvalidInputError,
            "UTF-8 cannot encode",
        ),
        (store.upsert, ("coco", "v1", None, one, [{"\udfff": 1}]), InvalidInputError, "UTF-8"),
        (
            store.upsert,
            ("coco", "v1", None, one, [{"x": float("nan")}]),
            InvalidInputError,
            "not finite",
        ),
        (store.upsert, ("coco", "v1", None, one, [{'a"b': 1}]), InvalidInputError, "quote"),
        (store.upsert, ("coco", "v1", ["\udfff"], one), InvalidInputError, r"ids\[0\]"),
        (store.upsert, ("coco", "v1", None, [[10**400] * D]), InvalidInputError, "numeric"),
        (
            store.search,
            ("coco", "v1", ok, 5, {"x": 2**63}),
            InvalidInputError,
            r"filter\['x'\]: the integer 9223372036854775808 is outside int64",
        ),
        (store.search, ("coco", "v1", ok, 5, {"x": -(2**63) - 1}), InvalidInputError, "int64"),
        (store.search, ("coco", "v1", ok, 5, {"x": "\udfff"}), InvalidInputError, "UTF-8"),
        (store.search, ("coco", "v1", ok, 5, {'a"b': 1}), InvalidInputError, "quote"),
        (store.upsert, ("coco", "v1", None, one, [{}, {}]), InvalidInputError, "2 payloads"),
        (store.search, ("coco", "v1", ok, 5, {"x": 1.5}), InvalidInputError, "exact match"),
        (
            store.search,
            ("coco", "v1", ok, 5, {"prompt_version": "v2"}),
            InvalidInputError,
            "reserved",
        ),
        (store.search, ("nope", "v1", ok), UnknownTaskError, "'nope'"),
        (store.upsert, ("nope", "v1", None, one), UnknownTaskError, "'nope'"),
        (store.promote, ("nope", "v1"), UnknownTaskError, "'nope'"),
        (store.count, ("coco", "v9"), UnknownVersionError, "'v9'"),
        (store.promote, ("coco", "v9"), UnknownVersionError, "'v9'"),
        (store.search, ("Bad Task", "v1", ok), InvalidInputError, "task"),
        (store.search, ("coco", "v@1", ok), InvalidInputError, "version"),
        (store.ensure_task, ("coco", 0, "v2"), InvalidInputError, "dim"),
        (store.ensure_task, ("coco", D + 1, "v1"), ConflictError, "size 16, not 17"),
    ]:
        with pytest.raises(error, match=message):
            method(*args)
    assert store.count("coco", "v1") == 4  # nothing above wrote anything


@pytest.mark.parametrize("opener", ALL, indirect=True)
def test_concurrent_upserts_and_searches(store):
    """The server calls the store from a thread pool: writers and readers at once."""
    rng = np.random.default_rng(8)
    vectors = unit(rng, 64)
    ids = [f"p{i}" for i in range(64)]
    store.ensure_task("coco", D, "v1")

    def write(rows: range) -> None:
        for lo in rows:
            store.upsert("coco", "v1", ids[lo : lo + 8], vectors[lo : lo + 8])

    def read(seed: int) -> None:
        for query in unit(np.random.default_rng(seed), 15):
            hits = store.search("coco", "v1", query, top_k=3)
            scores = [hit.score for hit in hits]  # a consistent view: best first, known ids
            assert len(hits) <= 3 and scores == sorted(scores, reverse=True)
            assert {hit.id for hit in hits} <= set(ids)

    with ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(write, range(0, 64, 16)), pool.submit(write, range(8, 64, 16))]
        jobs += [pool.submit(read, seed) for seed in (1, 2)]
        for job in jobs:
            job.result()  # re-raises what the thread raised
    assert store.count("coco", "v1") == 64
    for row in (0, 9, 63):
        assert store.search("coco", "v1", vectors[row], top_k=1)[0].id == ids[row]


@pytest.mark.parametrize("opener", ON_DISK, indirect=True)
def test_acknowledged_writes_survive_reopen_and_a_killed_process(opener, tmp_path, request):
    rng = np.random.default_rng(6)
    vectors = unit(rng, 12)
    store = opener()
    fill(store, "coco", "v1", vectors)
    fill(store, "coco", "v2", vectors[::-1].copy())
    store.promote("coco", "v2")
    store.close()
    store = opener()
    assert store.serving_version("coco") == "v2" and store.versions("coco") == ["v1", "v2"]
    assert store.count("coco", "v1") == 12
    hit = store.search("coco", "v1", vectors[4], top_k=1)[0]
    assert (hit.id, hit.payload["group"]) == ("coco-v1-4", "g1")
    with pytest.raises(StoreError, match="another"):  # one process per data directory
        open_store(request.node.callspec.params["opener"], tmp_path / "data")
    store.close()

    # a process that upserts and dies without closing: what upsert acknowledged is there
    kind = request.node.callspec.params["opener"]
    code = textwrap.dedent(f"""
        import os, numpy as np
        from tests.test_store import open_store
        store = open_store({kind!r}, {str(tmp_path / "data")!r})
        store.upsert("coco", "v1", ["late"], np.ones((1, {D})), [{{"late": True}}])
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
    store = opener()
    assert store.count("coco", "v1") == 13
    assert store.search("coco", "v1", np.ones(D), top_k=1)[0].payload == {"late": True}
    with pytest.raises(ConflictError, match="layout"):
        other = "tenant" if store.layout == "collection-per-task" else "collection-per-task"
        store.close()
        opener(layout=other)


@pytest.mark.skipif(not HAS_EDGE, reason="qdrant-edge-py is not installed")
def test_edge_matches_local_mode(tmp_path):
    """The in-process engine and qdrant-client's local mode agree: same top-k, same scores."""
    from server.store import EdgeStore

    rng = np.random.default_rng(7)
    vectors, queries = unit(rng, 300, 64), rng.standard_normal((20, 64))
    local = QdrantStore(location=":memory:")
    edge = EdgeStore(tmp_path / "edge", search_threads=1, index_threads=1)
    try:
        for store in (local, edge):
            fill(store, "coco", "v1", vectors)
        edge.optimize()  # too small to index: the searches below must stay exact
        for query in queries:
            for filter in (None, {"even": True}):
                a = local.search("coco", "v1", query, top_k=10, filter=filter)
                b = edge.search("coco", "v1", query, top_k=10, filter=filter)
                assert [hit.id for hit in a] == [hit.id for hit in b]
                np.testing.assert_allclose(
                    [h.score for h in a], [h.score for h in b], atol=SCORE_TOLERANCE
                )
    finally:
        local.close()
        edge.close()


def test_constructor_arguments_are_checked(tmp_path):
    with pytest.raises(InvalidInputError, match="exactly one"):
        QdrantStore()
    with pytest.raises(InvalidInputError, match="exactly one"):
        QdrantStore(tmp_path, url="http://localhost:6333")
    with pytest.raises(InvalidInputError, match="location"):
        QdrantStore(location="/tmp/x")
    with pytest.raises(InvalidInputError, match="api_key"):
        QdrantStore(tmp_path, api_key="k")
    with pytest.raises(InvalidInputError, match="layout"):
        QdrantStore(location=":memory:", layout="sharded")
    with pytest.raises(InvalidInputError, match="prefix"):
        QdrantStore(location=":memory:", prefix="a_b")
