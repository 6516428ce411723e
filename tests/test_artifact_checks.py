"""The layers under the hostile-artifact defences, each on its own: the writer and reader
derive one version, routing leaves out unusable keys, the engine probes what it adds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lpi
from export.artifact import (
    ArtifactHeaderError,
    content_version,
    read_artifact,
    task_id,
    tensors_digest,
    write_artifact,
)
from lpi.routing import TaskKeys, unit_rows, usable_centres
from server.engine import EngineError, TorchEngine, probe, unusable_rows
from tests.artifact_edits import random_folded, read_raw


@pytest.fixture(scope="module")
def backbone():
    return lpi.load_backbone("tiny", seed=5)


@pytest.fixture(scope="module")
def written(backbone, tmp_path_factory):
    folded = random_folded(backbone, 2)
    centres = {m: unit_rows(torch.randn(5, 64)) for m in ("image", "text")}
    path = tmp_path_factory.mktemp("written") / "task.safetensors"
    return write_artifact(path, "Task", folded, backbone, keys=centres), folded


def test_writer_and_reader_derive_one_version_from_the_tensors(written, backbone):
    artifact, _ = written
    meta, tensors = read_raw(artifact.path)
    assert meta["prompt_version"] == content_version(tensors_digest(tensors))
    again = read_artifact(artifact.path, backbone)
    assert again.prompt_version == artifact.prompt_version == artifact.digest[:16]


def test_the_writer_lets_no_extra_field_replace_a_computed_one(written, backbone, tmp_path):
    _, folded = written
    with pytest.raises(ArtifactHeaderError, match="prompt_version"):
        write_artifact(
            tmp_path / "x.safetensors", "x", folded, backbone, extra={"prompt_version": "../../x"}
        )
    assert not list(tmp_path.iterdir())


def test_long_task_names_give_short_distinct_ids():
    first, second = task_id("a" * 300), task_id("a" * 299 + "b")
    assert len(first) <= 100 and first != second
    assert task_id("Shapes & Colours") == "shapes-colours"


def test_routing_leaves_out_unusable_keys_and_routes_by_the_rest():
    generator = torch.Generator().manual_seed(7)
    good = {
        name: {m: unit_rows(torch.randn(5, 64, generator=generator)) for m in ("image", "text")}
        for name in ("one", "two")
    }
    bad = {
        "narrow": {"image": unit_rows(torch.randn(5, 32)), "text": unit_rows(torch.randn(5, 32))},
        "flat": {"image": torch.randn(64), "text": good["one"]["text"]},
        "empty": {"image": torch.zeros(0, 64), "text": good["one"]["text"]},
        "zeros": {"image": torch.zeros(5, 64), "text": good["one"]["text"]},
        "half": {"image": good["one"]["image"]},
        "unnormalised": {"image": good["one"]["image"] * 2, "text": good["one"]["text"]},
        "integers": {"image": torch.ones(5, 64, dtype=torch.long), "text": good["one"]["text"]},
    }
    usable, skipped = usable_centres({"one": good["one"], **bad, "two": good["two"]}, 64)
    assert list(usable) == ["one", "two"] and sorted(skipped) == sorted(bad)
    queries = torch.randn(32, 64, generator=generator)
    keys, reference = TaskKeys.from_centres(usable), TaskKeys.from_centres(good)
    for modality in ("image", "text"):
        assert keys.route_names(queries, modality) == reference.route_names(queries, modality)


def test_unusable_rows_finds_every_kind_of_bad_vector():
    rows = unit_rows(torch.randn(6, 8))
    rows[1] = float("nan")
    rows[2, 0] = float("inf")
    rows[3] = 0
    rows[4] *= 1e6
    assert unusable_rows(rows) == [1, 2, 3, 4]


def test_the_engine_probes_what_it_adds_and_keeps_nothing_that_fails(written, backbone):
    artifact, folded = written
    engine = TorchEngine(backbone, slots=4, dtype="float32")
    engine.add(("good", artifact.prompt_version), artifact)
    probe(engine, ("good", artifact.prompt_version))  # passes again: nothing changed
    poisoned_text = dataclasses.replace(folded.text, value_m=folded.text.value_m * 1e30)
    poisoned = dataclasses.replace(artifact, folded=dataclasses.replace(folded, text=poisoned_text))
    with pytest.raises(EngineError, match="probe") as refused:
        engine.add(("bad", "v"), poisoned)
    assert refused.value.field == "artifact"
    assert engine.loaded() == [("good", artifact.prompt_version)]
