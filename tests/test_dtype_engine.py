"""The torch engine in half precision against float32, through the engine and the server.

Tasks are folded at export against float32 weights; a half engine casts only the folded
factors, so its pool holds exactly the float32 fold cast to its dtype. Vectors: cosine >= 0.999
per row of float32 (the reason is in tests/test_dtype.py). A dtype the hardware lacks falls
back to float32 and says so (log, /readyz).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lpi
from export.tasks import export_run
from lpi import precision
from server.engine import TorchEngine, build_engine
from tests.test_server_engine import ROWS, batch_inputs, key, row_keys


@pytest.fixture(scope="module")
def fingerprint(backbone):
    return lpi.fingerprint(backbone)


@pytest.fixture(scope="module")
def artifacts(tiny_runs, backbone, tmp_path_factory):
    out = tmp_path_factory.mktemp("dtype-artifacts")
    lpi_tasks = export_run(tiny_runs / "lpi", backbone, out / "lpi")
    dense = export_run(tiny_runs / "dense", backbone, out / "dense")
    return {"a": lpi_tasks[0], "b": lpi_tasks[1], "c": dense[0]}


@pytest.fixture(scope="module")
def engine(backbone, fingerprint, artifacts):
    engine = TorchEngine(
        copy.deepcopy(backbone),
        slots=8,
        max_rank=2,
        backbone_fingerprint=fingerprint,
        dtype="float32",
    )
    for name in "abc":
        engine.add(key(artifacts[name]), artifacts[name])
    return engine


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_engine_holds_the_float32_fold_cast_and_equals_float32(
    backbone, fingerprint, artifacts, engine, dtype
):
    """Tasks are folded at export against float32 weights; a half engine casts only the
    folded factors (so its pool equals the float32 fold cast), and its vectors stay within
    cosine 0.999 per row of the float32 engine's (tests/test_dtype.py gives the reason)."""
    half = TorchEngine(
        copy.deepcopy(backbone), slots=8, max_rank=2, backbone_fingerprint=fingerprint, dtype=dtype
    )
    served = precision.resolve_dtype(dtype, "cpu").dtype  # float16: float32 on most CPUs
    assert half.dtype == precision.NAMES[served] and half.backbone_id == fingerprint
    for name in "abc":
        half.add(key(artifacts[name]), artifacts[name])
    for tower in ("image", "text"):
        pool = half._pools[tower]
        assert pool.U_K.dtype == served
        folded = getattr(artifacts["a"].folded, tower)
        with pool.lease([key(artifacts["a"])]) as slots:
            slot = int(slots[0])
            rank = folded.rank
            for stored, exact in zip(
                (pool.U_K, pool.M_K, pool.U_V, pool.M_V),
                (folded.key_u, folded.key_m, folded.value_u, folded.value_m),
                strict=True,
            ):
                if exact.shape[-1] == rank:  # U: [J, N, R']
                    part = stored[:, slot, :, :rank]
                else:  # M: [J, R', D]
                    part = stored[:, slot, :rank]
                assert torch.equal(part, exact.to(served))
    for modality in ("image", "text"):
        inputs = batch_inputs(backbone, modality, len(ROWS), seed=5)
        keys = row_keys(ROWS, artifacts)
        got, want = half.encode(modality, inputs, keys), engine.encode(modality, inputs, keys)
        assert got.dtype == torch.float32
        assert F.cosine_similarity(got, want, dim=-1).min() >= 0.999


def test_the_server_in_bfloat16_equals_float32_and_reports_its_dtype(
    tiny_runs, backbone, artifacts, tmp_path
):
    """`--dtype bfloat16` end to end: /embed within cosine 0.999 per row of the float32
    model call; /readyz and /metrics name the dtype (a CPU without bf16 reports its fall-back)."""
    from tests.server_helpers import (
        b64,
        cosines,
        create_app,
        png_bytes,
        reference_features,
        run,
        running,
        settings,
    )

    artifact = artifacts["a"]
    config = settings(tiny_runs, tmp_path / "d", artifact.path.parent, dtype="bfloat16")
    texts, images = ["a red square", "a blue circle"], [png_bytes(4)]
    expected = precision.resolve_dtype("bfloat16", "cpu")

    async def scenario():
        async with running(create_app(config)) as client:
            loaded = await client.put("/tasks/t", json={"path": artifact.path.name})
            embedded = await client.post(
                "/embed", json={"task": "t", "texts": texts, "images": [b64(images[0])]}
            )
            return (
                loaded,
                embedded.json(),
                (await client.get("/readyz")).json(),
                (await client.get("/metrics")).text,
            )

    loaded, embedded, ready, metrics = run(scenario())
    assert loaded.status_code == 200
    assert ready["dtype"] == expected.name and ready["dtype_reason"] == expected.reason
    assert f'dtype="{expected.name}"' in metrics
    want = reference_features(backbone, artifact.path, texts, images)
    assert cosines(embedded["text_embeddings"], want["text"]).min() >= 0.999
    assert cosines(embedded["image_embeddings"], want["image"]).min() >= 0.999


def test_bfloat16_without_hardware_support_falls_back_to_float32_visibly(
    backbone, fingerprint, monkeypatch, caplog
):
    monkeypatch.setattr(precision, "cpu_flags", lambda *a: frozenset({"avx2"}))
    with caplog.at_level("WARNING", logger="server.engine"):
        engine = TorchEngine(
            copy.deepcopy(backbone), backbone_fingerprint=fingerprint, dtype="bfloat16"
        )
    assert engine.dtype == "float32" and "no native bfloat16" in engine.dtype_reason
    assert next(engine.backbone.parameters()).dtype == torch.float32
    assert any("no native bfloat16" in r.getMessage() for r in caplog.records)


def test_onnx_engine_serves_the_int8_export_by_default(
    backbone, fingerprint, artifacts, engine, tmp_path
):
    """`--engine onnx` with precision auto picks the export's int8 graphs; their vectors stay
    within cosine 0.99 per row of the float32 torch engine (the bound the export checked)."""
    pytest.importorskip("onnxruntime")
    from export.onnx_export import export_towers

    meta = artifacts["a"].meta
    export_towers(backbone, tmp_path, meta["layers"], meta["tokens"], fp16=False, quantize="int8")
    onnx = build_engine(
        "onnx", backbone, onnx_dir=tmp_path, threads=1, backbone_fingerprint=fingerprint
    )
    assert onnx.dtype == "int8" and "int8" in onnx.dtype_reason
    for name in "abc":
        onnx.add(key(artifacts[name]), artifacts[name])
    for modality in ("image", "text"):
        inputs = batch_inputs(backbone, modality, len(ROWS), seed=9)
        keys = row_keys(ROWS, artifacts)
        got, want = onnx.encode(modality, inputs, keys), engine.encode(modality, inputs, keys)
        assert F.cosine_similarity(got, want, dim=-1).min() >= 0.99
    exact = build_engine(
        "onnx",
        backbone,
        onnx_dir=tmp_path,
        threads=1,
        backbone_fingerprint=fingerprint,
        precision="float32",
    )
    assert exact.dtype == "float32"


def test_default_threads_leave_a_core_to_the_batcher_and_event_loop(backbone, fingerprint):
    from server.threads import default_threads, usable_cores

    assert [default_threads(cores) for cores in (1, 2, 4, 16)] == [1, 1, 3, 15]
    before = torch.get_num_threads()
    try:
        engine = build_engine("torch", copy.deepcopy(backbone), backbone_fingerprint=fingerprint)
        assert engine.threads == torch.get_num_threads() == default_threads(usable_cores())
    finally:
        torch.set_num_threads(before)


def test_vectors_indexed_in_bfloat16_are_found_in_float32(tiny_runs, artifacts, tmp_path):
    """The same backbone fingerprint and prompt version under both dtypes: a float32 server on
    the data a bfloat16 server indexed finds each image first, at score ~1 (bf16 vectors are
    within ~1e-4 of float32 ones)."""
    from tests.server_helpers import b64, create_app, png_bytes, run, running, settings

    artifact, data = artifacts["a"], tmp_path / "d"
    images = [png_bytes(seed) for seed in range(4)]

    async def index():
        config = settings(tiny_runs, data, artifact.path.parent, dtype="bfloat16", store="local")
        async with running(create_app(config)) as client:
            assert (await client.put("/tasks/t", json={"path": artifact.path.name})).is_success
            items = [{"id": f"img{i}", "image": b64(image)} for i, image in enumerate(images)]
            return await client.post("/index", json={"task": "t", "items": items})

    async def search():
        config = settings(tiny_runs, data, artifact.path.parent, dtype="float32", store="local")
        async with running(create_app(config)) as client:
            assert (await client.get("/readyz")).json()["dtype"] == "float32"
            return [
                (
                    await client.post(
                        "/search", json={"task": "t", "top_k": 1, "query": {"image": b64(image)}}
                    )
                ).json()
                for image in images
            ]

    indexed = run(index())
    assert indexed.status_code == 200, indexed.text
    for i, found in enumerate(run(search())):
        assert found["hits"][0]["id"] == f"img{i}" and found["hits"][0]["score"] >= 0.999
