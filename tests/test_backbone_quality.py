"""benchmarks/backbone_quality.py on the tiny bundle: its routing at the trainer's default
centre count reproduces what the trained run recorded (same keys, same queries), and the
per-centre-count table is complete."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from lpi.checkpoint import load_backbone
from lpi.continual.data.loader import eval_set
from lpi.continual.data.manifest import read_manifest, select
from lpi.continual.evaluation import key_features, make_test_set
from lpi.continual.run_state import load_state
from lpi.routing import CLUSTERS, TaskKeys

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO / "benchmarks"))
        yield importlib.import_module("backbone_quality")


def test_routing_matches_the_runs_own_final_evaluation(quality, tiny_runs, tmp_path):
    manifest = tiny_runs / "data" / "manifest.jsonl"
    out = tmp_path / "quality.json"
    backbone = str(tiny_runs / "backbone.safetensors")
    args = ["--backbone", backbone, "--manifest", str(manifest), "--centres", "2", str(CLUSTERS)]
    quality.main([*args, "--out", str(out)])
    result = json.loads(out.read_text())
    assert [row["centres"] for row in result["routing"]] == [2, CLUSTERS]
    final = load_state(tiny_runs / "lpi").results[-1]  # the trainer's keys fit the same way
    at_default = result["routing"][1]
    for modality in ("image", "text"):
        assert at_default[modality]["values"] == [final["routing_accuracy"][modality]]
        assert at_default[modality]["std"] is None  # one manifest: no spread measured
        recorded = final["routing_confusion"][modality]
        assert at_default[f"{modality}_own_task"] == {
            task: shares.get(task, 0.0) for task, shares in recorded.items()
        }
    assert not result["per_manifest"][0]["manifest"].startswith("/")  # no machine paths
    # Another count against keys fitted and queries routed here, through TaskKeys directly.
    backbone = load_backbone(str(tiny_runs / "backbone.safetensors"))
    records = read_manifest(manifest)
    names = list(dict.fromkeys(r.task for r in records))
    keys = TaskKeys(2)
    for task in names:
        keys.add(task, *key_features(backbone, select(records, task, "train")))
    size = backbone.config.vision.image_size
    hits = {"image": 0, "text": 0}
    totals = {"image": 0, "text": 0}
    for task in names:
        test = make_test_set(*eval_set(select(records, task, "test"), size))
        with torch.no_grad():
            queries = {
                "image": backbone.encode_image(test.pixels),
                "text": backbone.encode_text(test.tokens),
            }
        for modality, features in queries.items():
            routed = keys.route_names(features.float(), modality)
            hits[modality] += sum(name == task for name in routed)
            totals[modality] += len(routed)
    for modality in ("image", "text"):
        expected = 100.0 * hits[modality] / totals[modality]
        assert result["routing"][0][modality]["values"] == [pytest.approx(expected)]


def test_two_manifests_give_mean_and_std(quality, tiny_runs, tmp_path):
    manifest = str(tiny_runs / "data" / "manifest.jsonl")
    out = tmp_path / "quality.json"
    backbone = str(tiny_runs / "backbone.safetensors")
    args = ["--backbone", backbone, "--manifest", manifest, manifest, "--centres", "1"]
    quality.main([*args, "--out", str(out)])
    (row,) = json.loads(out.read_text())["routing"]
    assert len(row["image"]["values"]) == 2 and row["image"]["std"] == 0.0  # same data twice
    assert row["image"]["values"][0] == row["image"]["values"][1]


def test_a_centre_count_below_one_is_refused(quality, capsys):
    with pytest.raises(SystemExit):
        quality.parse_args(["--backbone", "b", "--manifest", "m", "--centres", "0"])
    assert "--centres" in capsys.readouterr().err
