"""The serving engines against the reference path, on batches that mix tasks and bare rows.

TorchEngine vs `lpi.batch_prefix` of each artifact's `task_prefix()` through the backbone:
max |diff| <= 1e-5 on unit-norm float32 features. Both read the same float32 factors; the
reference multiplies U @ M once per task and attends through the materialised `Prefix`, the
engine multiplies per row inside the slot path (the pool's zero-padded ranks add exact zeros),
so at most summation orders differ (identical on the CPU here); a wrong slot, mask or layer
moves features by 1e-2 or more.

OnnxEngine vs TorchEngine: cosine >= 0.9999 per row and max |diff| <= 1e-4, the float32 ONNX
bound of tests/test_onnx.py (onnxruntime's kernels and summation orders, ~3e-7 seen).

Artifacts come from the session's trained tiny runs (conftest `tiny_runs`): two LPI tasks and
a dense task that shares the first one's name, so two prompt versions of one task are loaded
side by side. One float32 ONNX export (no fp16 graphs, ~10 s) serves the module.
"""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest
import torch
import torch.nn.functional as F

import lpi
from export.tasks import export_run
from kernels import NotInPoolError
from server.engine import Engine, EngineError, OnnxEngine, TorchEngine, build_engine
from tests.conftest import CAPTIONS, random_pixels

TOLERANCE = 1e-5
ONNX_MIN_COSINE, ONNX_MAX_DIFF = 0.9999, 1e-4
ROWS = ["a", "b", None, "a", "c", None]  # tasks by fixture name; None = bare backbone


@pytest.fixture(scope="module")
def fingerprint(backbone):
    return lpi.fingerprint(backbone)


@pytest.fixture(scope="module")
def artifacts(tiny_runs, backbone, tmp_path_factory):
    """{"a", "b"}: the LPI run's tasks; "c": the dense run's first task (same name as "a")."""
    out = tmp_path_factory.mktemp("engine-artifacts")
    lpi_tasks = export_run(tiny_runs / "lpi", backbone, out / "lpi")
    dense = export_run(tiny_runs / "dense", backbone, out / "dense")
    return {"a": lpi_tasks[0], "b": lpi_tasks[1], "c": dense[0]}


def key(artifact) -> tuple[str, str]:
    return artifact.name, artifact.prompt_version


@pytest.fixture
def engine(backbone, fingerprint, artifacts):
    """A TorchEngine with "a", "b" and "c" loaded."""
    engine = TorchEngine(
        backbone, slots=8, max_rank=2, backbone_fingerprint=fingerprint, dtype="float32"
    )
    for name in "abc":
        engine.add(key(artifacts[name]), artifacts[name])
    return engine


def batch_inputs(backbone, modality: str, rows: int, seed: int = 7) -> torch.Tensor:
    """Random pixels [B, 3, S, S], or ragged captions [B, 77] as lpi.tokenize pads them."""
    if modality == "image":
        return random_pixels(backbone, rows, torch.Generator().manual_seed(seed))
    return lpi.tokenize([CAPTIONS[(row + seed) % len(CAPTIONS)] for row in range(rows)])


def reference(backbone, modality: str, inputs, rows: list, artifacts: dict) -> torch.Tensor:
    """The training path: materialised task prefixes gathered per row (lpi.batch_prefix)."""
    names = sorted({name for name in rows if name is not None})
    index = torch.tensor([-1 if name is None else names.index(name) for name in rows])
    image, text = lpi.batch_prefix([artifacts[name].task_prefix() for name in names], index)
    with torch.no_grad():
        if modality == "image":
            return backbone.encode_image(inputs, image)
        return backbone.encode_text(inputs, text)


def row_keys(rows: list, artifacts: dict) -> list:
    return [None if name is None else key(artifacts[name]) for name in rows]


# ---------------------------------------------------------------------------------- torch


@pytest.mark.parametrize("max_rank", [2, 16], ids=["pool-rank-from-task", "zero-padded-rank"])
@pytest.mark.parametrize("modality", ["image", "text"])
def test_torch_engine_mixed_batch_equals_reference(
    backbone, fingerprint, artifacts, modality, max_rank
):
    engine = TorchEngine(
        backbone, slots=8, max_rank=max_rank, backbone_fingerprint=fingerprint, dtype="float32"
    )
    for name in "abc":
        engine.add(key(artifacts[name]), artifacts[name])
    assert artifacts["a"].name == artifacts["c"].name and key(artifacts["a"]) != key(artifacts["c"])
    inputs = batch_inputs(backbone, modality, len(ROWS))
    got = engine.encode(modality, inputs, row_keys(ROWS, artifacts))
    assert got.shape == (len(ROWS), engine.embed_dim) and got.dtype == torch.float32
    assert got.device.type == "cpu" and not got.is_inference()
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(ROWS)), atol=1e-5)
    want = reference(backbone, modality, inputs, ROWS, artifacts)
    assert (got - want).abs().max() <= TOLERANCE
    with torch.no_grad():
        bare = (
            backbone.encode_image(inputs) if modality == "image" else backbone.encode_text(inputs)
        )
    assert (got[[2, 5]] - bare[[2, 5]]).abs().max() <= TOLERANCE  # no task: the bare backbone
    assert (got[[0, 3]] - bare[[0, 3]]).abs().max() > 1e-3, "the task must change the vector"


@pytest.mark.parametrize("modality", ["image", "text"])
def test_all_bare_rows_run_the_bare_backbone(backbone, fingerprint, modality):
    """No task at all, not even a pool yet: prefix=None through the backbone, exactly."""
    engine = TorchEngine(backbone, backbone_fingerprint=fingerprint, dtype="float32")
    inputs = batch_inputs(backbone, modality, 3)
    with torch.no_grad():
        want = (
            backbone.encode_image(inputs) if modality == "image" else backbone.encode_text(inputs)
        )
    assert torch.equal(engine.encode(modality, inputs, [None] * 3), want)


def test_engines_satisfy_the_interface(engine):
    assert isinstance(engine, Engine)
    assert engine.name == "torch" and engine.context_length == 77


def test_remove_then_add_again(engine, backbone, artifacts):
    a = key(artifacts["a"])
    engine.remove(a)
    assert engine.loaded() == [key(artifacts["b"]), key(artifacts["c"])]
    inputs = batch_inputs(backbone, "image", len(ROWS))
    with pytest.raises(NotInPoolError):
        engine.encode("image", inputs, row_keys(ROWS, artifacts))
    with pytest.raises(KeyError):
        engine.remove(a)
    engine.add(a, artifacts["a"])
    assert engine.loaded()[-1] == a
    got = engine.encode("image", inputs, row_keys(ROWS, artifacts))
    assert (got - reference(backbone, "image", inputs, ROWS, artifacts)).abs().max() <= TOLERANCE


def test_a_key_loaded_twice_is_refused(engine, artifacts):
    before = engine.loaded()
    with pytest.raises(EngineError, match="already loaded") as err:
        engine.add(key(artifacts["b"]), artifacts["b"])
    assert err.value.field == "task" and engine.loaded() == before


def _tower(tower: lpi.FoldedTower, u, m) -> lpi.FoldedTower:
    return lpi.FoldedTower(u(tower.key_u), m(tower.key_m), u(tower.value_u), m(tower.value_m))


def edited(artifact, u=lambda t: t, m=lambda t: t, meta=None):
    """The artifact with its factors U [J, N, R'] and M [J, R', D] (or its meta) edited."""
    folded = lpi.FoldedTask(_tower(artifact.folded.image, u, m), _tower(artifact.folded.text, u, m))
    return dataclasses.replace(artifact, folded=folded, meta={**artifact.meta, **(meta or {})})


EDITS = {
    "artifact.layers": {"u": lambda t: t[:1], "m": lambda t: t[:1]},  # J = 1, the pool's 2
    "artifact.tokens": {"u": lambda t: t[:, :3]},  # N = 3, the pool's 4
    "artifact.rank": {  # R' = 5, above the pool's max(max_rank 2, 4); zeros keep U @ M
        "u": lambda t: F.pad(t, (0, 1)),
        "m": lambda t: F.pad(t, (0, 0, 0, 1)),
    },
}


@pytest.mark.parametrize("field", list(EDITS))
def test_check_refuses_what_the_pools_cannot_hold(engine, artifacts, field):
    bad = edited(artifacts["a"], **EDITS[field])
    before = engine.loaded()
    with pytest.raises(EngineError) as err:
        engine.check(bad)
    assert err.value.field == field
    with pytest.raises(EngineError) as err:
        engine.add(("bad", "v1"), bad)
    assert err.value.field == field and engine.loaded() == before
    engine.check(artifacts["a"])  # the unedited artifact fits


def test_a_full_pool_is_refused_and_a_leased_slot_waits(backbone, fingerprint, artifacts):
    engine = TorchEngine(backbone, slots=2, backbone_fingerprint=fingerprint, dtype="float32")
    a, b, c = (key(artifacts[name]) for name in "abc")
    engine.add(a, artifacts["a"])
    engine.add(b, artifacts["b"])
    for attempt in (lambda: engine.check(artifacts["c"]), lambda: engine.add(c, artifacts["c"])):
        with pytest.raises(EngineError, match="no free task slot") as err:
            attempt()
        assert err.value.field == "task"
    # A batch still reading "a" on the image tower keeps its slot after "a" is removed.
    with engine._pools["image"].lease([a]):
        engine.remove(a)
        with pytest.raises(EngineError) as err:
            engine.add(c, artifacts["c"])
        assert err.value.field == "task" and engine.loaded() == [b]
    engine.add(c, artifacts["c"])
    assert engine.loaded() == [b, c]


def test_encode_while_tasks_come_and_go(engine, backbone, artifacts):
    """Rows of a loaded task stay exact while another task is added and removed meanwhile."""
    rows = ["a", None, "a"]
    inputs = batch_inputs(backbone, "text", len(rows))
    want = reference(backbone, "text", inputs, rows, artifacts)
    stop = threading.Event()
    errors = []

    def churn():
        b = key(artifacts["b"])
        try:
            while not stop.wait(0.001):  # let the encoding thread have the GIL too
                engine.remove(b)
                engine.add(b, artifacts["b"])
        except Exception as err:  # reported by the main thread
            errors.append(err)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(20):
            got = engine.encode("text", inputs, row_keys(rows, artifacts))
            assert (got - want).abs().max() <= TOLERANCE
    finally:
        stop.set()
        worker.join()
    assert not errors


def test_bad_calls_are_refused(engine, backbone, artifacts):
    inputs = batch_inputs(backbone, "image", 2)
    with pytest.raises(ValueError, match="3 keys"):
        engine.encode("image", inputs, [None] * 3)
    with pytest.raises(ValueError, match="modality"):
        engine.encode("audio", inputs, [None] * 2)
    with pytest.raises(ValueError, match="engine kind"):
        build_engine("tensorrt", backbone)
    with pytest.raises(ValueError, match="onnx_dir"):
        build_engine("onnx", backbone)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("modality", ["image", "text"])
def test_torch_engine_on_cuda_matches_the_cpu_reference(backbone, fingerprint, artifacts, modality):
    """The fused kernel's path; cosine >= 0.999 per row (the cross-backend bound)."""
    engine = TorchEngine(copy.deepcopy(backbone), device="cuda", backbone_fingerprint=fingerprint)
    for name in "abc":
        engine.add(key(artifacts[name]), artifacts[name])
    inputs = batch_inputs(backbone, modality, len(ROWS))
    got = engine.encode(modality, inputs, row_keys(ROWS, artifacts))
    want = reference(backbone, modality, inputs, ROWS, artifacts)
    assert got.device.type == "cpu"
    assert F.cosine_similarity(got, want, dim=-1).min() >= 0.999


# ---------------------------------------------------------------------------------- onnx


@pytest.fixture(scope="module")
def onnx_dir(backbone, artifacts, tmp_path_factory):
    """float32 graphs of the tiny backbone at the artifacts' J and N."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")  # torch.onnx's dynamo exporter
    from export.onnx_export import export_towers

    out = tmp_path_factory.mktemp("engine-onnx")
    meta = artifacts["a"].meta
    export_towers(backbone, out, meta["layers"], meta["tokens"], fp16=False)
    return out


@pytest.fixture(scope="module")
def onnx_engine(onnx_dir, backbone, fingerprint, artifacts) -> OnnxEngine:
    engine = build_engine(
        "onnx", backbone, onnx_dir=onnx_dir, threads=1, backbone_fingerprint=fingerprint
    )
    for name in "abc":
        engine.add(key(artifacts[name]), artifacts[name])
    return engine


@pytest.mark.parametrize("modality", ["image", "text"])
def test_onnx_engine_equals_torch_engine_per_row(
    onnx_engine, engine, backbone, artifacts, modality
):
    assert isinstance(onnx_engine, Engine) and onnx_engine.name == "onnx"
    inputs = batch_inputs(backbone, modality, len(ROWS), seed=11)
    keys = row_keys(ROWS, artifacts)
    got, want = onnx_engine.encode(modality, inputs, keys), engine.encode(modality, inputs, keys)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert F.cosine_similarity(got, want, dim=-1).min() >= ONNX_MIN_COSINE
    assert (got - want).abs().max() <= ONNX_MAX_DIFF
    bare = [onnx_engine.encode(modality, inputs[:2], [None] * 2)]
    bare.append(engine.encode(modality, inputs[:2], [None] * 2))
    assert (bare[0] - bare[1]).abs().max() <= ONNX_MAX_DIFF


@pytest.mark.parametrize("field", ["artifact.layers", "artifact.tokens"])
def test_onnx_engine_refuses_another_prompt_shape(onnx_engine, artifacts, field):
    bad = edited(artifacts["a"], **EDITS[field])
    with pytest.raises(EngineError) as err:
        onnx_engine.check(bad)
    assert err.value.field == field
    with pytest.raises(EngineError):
        onnx_engine.add(("bad", "v1"), bad)
    assert ("bad", "v1") not in onnx_engine.loaded()


def test_onnx_engine_remove_then_add_again(onnx_engine, backbone, artifacts):
    b = key(artifacts["b"])
    onnx_engine.remove(b)
    inputs = batch_inputs(backbone, "image", len(ROWS))
    with pytest.raises(NotInPoolError):
        onnx_engine.encode("image", inputs, row_keys(ROWS, artifacts))
    with pytest.raises(EngineError, match="already loaded"):
        onnx_engine.add(key(artifacts["a"]), artifacts["a"])
    onnx_engine.add(b, artifacts["b"])
    assert sorted(onnx_engine.loaded()) == sorted(key(artifacts[name]) for name in "abc")


def test_the_server_on_the_onnx_engine_equals_the_direct_model_call(
    tiny_runs, backbone, artifacts, onnx_dir, tmp_path
):
    """`--engine onnx --onnx-dir DIR` wires the exported towers into the app end to end."""
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
    inbox = artifact.path.parent
    config = settings(tiny_runs, tmp_path / "d", inbox, engine="onnx", onnx_dir=onnx_dir)
    texts, images = ["a red square", "a blue circle"], [png_bytes(4)]

    async def scenario():
        async with running(create_app(config)) as client:
            loaded = await client.put("/tasks/t", json={"path": artifact.path.name})
            embedded = await client.post(
                "/embed", json={"task": "t", "texts": texts, "images": [b64(images[0])]}
            )
            ready = await client.get("/readyz")
            return loaded, embedded.json(), ready.json()

    loaded, embedded, ready = run(scenario())
    assert loaded.status_code == 200 and ready["engine"] == "onnx"
    want = reference_features(backbone, artifact.path, texts, images)
    # fp32 graphs of the same math: only summation order differs (per-row cosine).
    assert cosines(embedded["text_embeddings"], want["text"]).min() >= 0.9999
    assert cosines(embedded["image_embeddings"], want["image"]).min() >= 0.9999
