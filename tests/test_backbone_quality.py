"""benchmarks/backbone_quality.py on the tiny bundle: its routing at the trainer's default
centre count reproduces what the trained run recorded (same keys, same queries), and the
per-centre-count table is complete."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from lpi.continual.run_state import load_state
from lpi.routing import CLUSTERS

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
        assert at_default[modality]["std"] == 0.0
        recorded = final["routing_confusion"][modality]
        assert at_default[f"{modality}_own_task"] == {
            task: shares.get(task, 0.0) for task, shares in recorded.items()
        }
    assert not result["per_manifest"][0]["manifest"].startswith("/")  # no machine paths


def test_two_manifests_give_mean_and_std(quality, tiny_runs, tmp_path):
    manifest = str(tiny_runs / "data" / "manifest.jsonl")
    out = tmp_path / "quality.json"
    backbone = str(tiny_runs / "backbone.safetensors")
    args = ["--backbone", backbone, "--manifest", manifest, manifest, "--centres", "1"]
    quality.main([*args, "--out", str(out)])
    (row,) = json.loads(out.read_text())["routing"]
    assert len(row["image"]["values"]) == 2 and row["image"]["std"] == 0.0  # same data twice


def test_a_centre_count_below_one_is_refused(quality, tiny_runs, capsys):
    with pytest.raises(SystemExit):
        quality.parse_args(["--backbone", "b", "--manifest", "m", "--centres", "0"])
    assert "--centres" in capsys.readouterr().err
