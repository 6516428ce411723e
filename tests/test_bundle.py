"""export.bundle: one builder for the tests', the soak's and the demo's bundles, calling the
training API. Its reference is what the recipes it replaced did: drive the command lines
with argv lists (they stay as they were). On one machine and thread count the two paths run
the same float operations in the same order, so files and tensors must match exactly."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lpi
from export.bundle import BundleRecipe, build_bundle
from export.tasks import export_run
from lpi.continual.control import Cancelled, Control
from lpi.continual.data import synthetic
from lpi.continual.run_state import load_state, task_file
from lpi.continual.trainer import run_training
from lpi.pretrain import main as pretrain_main
from lpi.train import main as train_main
from tests.train_helpers import tiny_train_config


def _versions(folder) -> dict[str, str]:
    """task -> prompt version (a content hash) of each artifact in `folder`."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            out[path.stem] = json.loads(handle.metadata()["prompt_version"])
    return out


def _results(run) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in load_state(run).results]


def _same_tensors(a, b) -> None:
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """conftest's recipe built here, right before the comparisons: the session's own copy may
    have been built long before, and these tests compare floats bit for bit, which holds only
    for runs made under the same conditions (the same process state, thread count and load)."""
    from tests.conftest import TINY_RECIPE

    root = tmp_path_factory.mktemp("tiny-runs-here")
    build_bundle(BundleRecipe(**TINY_RECIPE), root)
    return root


def test_the_tests_recipe_gives_what_its_argv_lists_gave(tiny_runs, tmp_path):
    """conftest's `tiny_runs` recipe (and the soak's bundle) against the argv lists they used."""
    root = tmp_path / "cli"
    synthetic.main(
        [
            "--out",
            str(root / "data"),
            "--tasks",
            "2",
            "--train-per-task",
            "24",
            "--test-per-task",
            "12",
            "--pretrain",
            "16",
            "--image-size",
            "32",
        ]
    )
    backbone = lpi.save_backbone(lpi.load_backbone("tiny", seed=3), root / "backbone.safetensors")
    assert (
        train_main(
            [
                "--manifest",
                str(root / "data" / "manifest.jsonl"),
                "--backbone",
                str(backbone),
                "--out",
                str(root / "lpi"),
                "--method",
                "lpi",
                "--layers",
                "2",
                "--tokens",
                "4",
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--cache",
                "--lr",  # the bundle's recipe names its lr; lpi.train's default is per method
                str(BundleRecipe().lr),
            ]
        )
        == 0
    )
    for name in ("manifest.jsonl", "pretrain.jsonl"):
        assert (root / "data" / name).read_text() == (tiny_runs / "data" / name).read_text()
    assert backbone.read_bytes() == (tiny_runs / "backbone.safetensors").read_bytes()
    assert _results(root / "lpi") == _results(tiny_runs / "lpi")
    for index, task in enumerate(load_state(root / "lpi").done):
        _same_tensors(
            task_file(root / "lpi", index, task), task_file(tiny_runs / "lpi", index, task)
        )
    model = lpi.load_backbone(backbone)
    export_run(root / "lpi", model, root / "a")
    export_run(tiny_runs / "lpi", model, tmp_path / "b")
    assert _versions(root / "a") == _versions(tmp_path / "b") != {}


def test_the_demo_recipe_gives_what_its_argv_lists_gave(tmp_path):
    """The demo's recipe (pretraining included), at a fraction of its sizes."""
    from server.demo import (
        PRETRAIN_BATCH,
        PRETRAIN_LR,
        PRETRAIN_WEIGHT_DECAY,
        TASK_LR,
        DemoSizes,
        recipe_of,
    )

    sizes = DemoSizes(
        pretrain_images=32,
        pretrain_epochs=1,
        train_per_task=16,
        test_per_task=6,
        task_epochs=1,
        layers=2,
        tokens=4,
        batch_size=8,
    )
    built = build_bundle(recipe_of(1, sizes), tmp_path / "builder", device="cpu")
    root = tmp_path / "cli"
    synthetic.generate(root / "data", 1, 16, 6, 32, 32, 0)
    backbone = root / "backbone.safetensors"
    assert (
        pretrain_main(
            [
                "--manifest",
                str(root / "data" / "pretrain.jsonl"),
                "--out",
                str(backbone),
                "--preset",
                "tiny",
                "--epochs",
                "1",
                "--lr",
                str(PRETRAIN_LR),
                "--weight-decay",
                str(PRETRAIN_WEIGHT_DECAY),
                "--batch-size",
                str(PRETRAIN_BATCH),
                "--seed",
                "0",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (
        train_main(
            [
                "--manifest",
                str(root / "data" / "manifest.jsonl"),
                "--backbone",
                str(backbone),
                "--out",
                str(root / "run"),
                "--method",
                "lpi",
                "--layers",
                "2",
                "--tokens",
                "4",
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--lr",
                str(TASK_LR),
                "--seed",
                "0",
                "--device",
                "cpu",
                "--cache",
            ]
        )
        == 0
    )
    assert backbone.read_bytes() == built.backbone.read_bytes()
    export_run(root / "run", lpi.load_backbone(backbone), root / "artifacts")
    assert _versions(root / "artifacts") == _versions(
        built.artifacts["lpi"]["shapes-colours"].parent
    )
    assert list(built.artifacts["lpi"]) == ["shapes-colours"]


def test_a_cancelled_run_keeps_its_finished_tasks_and_resumes_to_the_same_result(
    tiny_runs, tmp_path
):
    """Cancelled halfway (in the second task): the first task is saved, the second is not;
    running the config again trains only the second and ends where an uncancelled run did."""
    config = tiny_train_config(tiny_runs, tiny_runs / "data", tmp_path / "run")
    cancel, heard = threading.Event(), []

    def report(label: str, fraction: float) -> None:
        heard.append((label, fraction))
        if fraction > 0.6:
            cancel.set()

    with pytest.raises(Cancelled):
        run_training(config, Control(cancel=cancel, report=report))
    first = load_state(config.out).done
    assert len(first) == 1 and not task_file(config.out, 1, "textures").exists()
    assert heard[0][1] == 0.0 and "(task 1/2 shapes-colours)" in heard[0][0]
    assert [f for _, f in heard] == sorted(f for _, f in heard), "progress never goes back"
    run_training(config)
    assert _results(config.out) == _results(tiny_runs / "lpi")


def test_control_parts_map_onto_the_whole_and_cancel_between_steps():
    heard = []
    cancel = threading.Event()
    whole = Control(cancel=cancel, report=lambda label, f: heard.append((label, f)), label="demo")
    stage = whole.part(0.5, 1.0, "2/2: training").part(0.0, 0.5, "(task 1/2)")
    stage.step(1, 2)
    assert heard == [("demo 2/2: training (task 1/2)", 0.625)]  # 0.5 + 0.5 * (0.5 * 1/2)
    stage.step(5, 2)  # clamped: a part never reports beyond its end
    assert heard[-1][1] == 0.75
    cancel.set()
    with pytest.raises(Cancelled, match="demo 2/2: training"):
        stage.step(2, 2)
