"""`python -m lpi.train` and `python -m lpi.evaluate` end to end on a tiny synthetic run."""

from __future__ import annotations

import json
import shutil

import pytest

import lpi
from export.bundle import BundleRecipe
from lpi.checkpoint import load_backbone
from lpi.continual.data.loader import eval_set
from lpi.continual.data.manifest import read_manifest, select
from lpi.continual.evaluation import frozen_features, key_features, make_test_set, routing_confusion
from lpi.continual.run_state import load_keys, load_state, task_file
from lpi.evaluate import main as evaluate_main
from lpi.routing import TaskKeys
from lpi.train import main as train_main


def _args(root, out, *extra):
    return [
        "--manifest",
        str(root / "data" / "manifest.jsonl"),
        "--backbone",
        str(root / "backbone.safetensors"),
        "--out",
        str(out),
        "--layers",
        "2",
        "--tokens",
        "4",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--cache",
        "--lr",  # the tiny runs' (the bundle's recipe), not the method's default
        str(BundleRecipe().lr),
        *extra,
    ]


def test_run_records_tasks_results_and_zero_oracle_forgetting(tiny_runs):
    state = load_state(tiny_runs / "lpi")
    assert state.done == state.config.tasks and len(state.done) == 2
    assert len(state.results) == 2 and state.parameters_per_task > 0
    first, last = state.results
    task = state.done[0]
    # Earlier tasks' prompts are frozen: with oracle task ids their recall cannot change.
    assert first["r1"]["oracle"][task] == last["r1"]["oracle"][task]
    for index, name in enumerate(state.done):
        assert task_file(tiny_runs / "lpi", index, name).exists()
    assert (tiny_runs / "lpi" / "keys.safetensors").exists()


def test_rerun_resumes_without_retraining(tiny_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs / "lpi", run)
    stamps = {p.name: p.stat().st_mtime_ns for p in run.glob("task-*")}
    assert train_main(_args(tiny_runs, run)) == 0
    assert {p.name: p.stat().st_mtime_ns for p in run.glob("task-*")} == stamps


def test_crash_mid_task_loses_only_that_task(tiny_runs, tmp_path):
    """A run whose last task never finished: the rerun trains just that task."""
    run = tmp_path / "run"
    shutil.copytree(tiny_runs / "lpi", run)
    data = json.loads((run / "run.json").read_text())
    lost = data["done"].pop()
    data["results"].pop()
    (run / "run.json").write_text(json.dumps(data))
    task_file(run, 1, lost).unlink()
    first = task_file(run, 0, data["done"][0])
    stamp = first.stat().st_mtime_ns
    assert train_main(_args(tiny_runs, run)) == 0
    state = load_state(run)
    assert state.done[-1] == lost and task_file(run, 1, lost).exists()
    assert first.stat().st_mtime_ns == stamp, "the finished task is not retrained"


def test_one_more_task_onto_a_finished_run(tiny_runs, tmp_path):
    tasks = load_state(tiny_runs / "lpi").done
    run = tmp_path / "run"
    assert train_main(_args(tiny_runs, run, "--tasks", tasks[0])) == 0
    assert load_state(run).done == tasks[:1]
    assert train_main(_args(tiny_runs, run, "--tasks", *tasks)) == 0
    assert load_state(run).done == tasks


def test_resume_with_another_method_is_refused(tiny_runs, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs / "lpi", run)
    assert train_main(_args(tiny_runs, run, "--method", "dense")) == 2
    assert "the run used method lpi" in caplog.text


def test_resume_with_another_recipe_is_refused(tiny_runs, tmp_path, caplog):
    """run.json records one learning rate (and epochs, batch, seed): a resume may not change it."""
    run = tmp_path / "run"
    shutil.copytree(tiny_runs / "lpi", run)
    stamps = {p.name: p.stat().st_mtime_ns for p in run.glob("task-*")}
    assert train_main(_args(tiny_runs, run, "--lr", "0.5")) == 2
    assert "lr" in caplog.text and "-> 0.5" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in run.glob("task-*")} == stamps


def test_key_centres_are_the_runs_own_on_resume_and_recorded(tiny_runs, tmp_path, caplog):
    """--key-centres 3: every task's keys hold 3 centres per modality, also the task added by a
    resume (which reloads the saved keys), and a resume with another count is refused."""
    tasks, run = load_state(tiny_runs / "lpi").done, tmp_path / "run"
    assert train_main(_args(tiny_runs, run, "--tasks", tasks[0], "--key-centres", "3")) == 0
    assert train_main(_args(tiny_runs, run, "--tasks", *tasks, "--key-centres", "3")) == 0
    keys = load_keys(run)
    assert keys is not None and keys.names == tuple(tasks)
    for task in tasks:
        for modality in ("image", "text"):
            assert keys.centres(task, modality).shape[0] == 3
    assert load_state(run).config.key_centres == 3
    assert train_main(_args(tiny_runs, run, "--tasks", *tasks)) == 2
    assert "key_centres 3 -> 5" in caplog.text


def test_bad_manifest_fails_before_training(tiny_runs, tmp_path, caplog):
    manifest = tiny_runs / "data" / "broken.jsonl"  # beside the images it names
    lines = (tiny_runs / "data" / "manifest.jsonl").read_text().splitlines()
    broken = json.loads(lines[2])
    broken["image"] = str(tmp_path / "missing.png")
    lines[2] = json.dumps(broken)
    manifest.write_text("\n".join(lines) + "\n")
    args = _args(tiny_runs, tmp_path / "run")
    args[1] = str(manifest)
    assert train_main(args) == 2
    assert f"{manifest}:3" in caplog.text and "missing.png" in caplog.text
    assert not (tmp_path / "run" / "run.json").exists()


@pytest.mark.parametrize("method", ["zero-shot", "shared", "lpi-no-interaction"])
def test_other_methods_run_and_evaluate(tiny_runs, tmp_path, method):
    run = tmp_path / method
    assert train_main(_args(tiny_runs, run, "--method", method)) == 0
    assert train_main(_args(tiny_runs, run, "--method", method)) == 0  # resumes: nothing to do
    assert evaluate_main([str(run)]) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["method"] == method and len(report["oracle"]["matrix"]) == 2


def test_evaluate_reproduces_the_recorded_final_evaluation(tiny_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs / "lpi", run)
    assert evaluate_main([str(run)]) == 0
    report = json.loads((run / "eval.json").read_text())
    recorded = load_state(run).results[-1]["r1"]
    assert report["final"]["r1"] == recorded, "checkpoints reproduce what training measured"
    assert report["oracle"]["mean_forgetting"] == 0.0
    assert (run / "recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for direction in ("i2t", "t2i"):
        assert set(report["final"]["oracle"][report["tasks"][0]]["union"][direction]) == {
            "1",
            "5",
            "10",
        }


def test_evaluate_with_refit_keys_leaves_the_runs_report_alone(tiny_runs, tmp_path):
    """--key-centres K refits keys from the train split: at the run's own count it reproduces
    the recorded routing (same fit, same queries), at 1 centre it routes as keys fitted here
    with 1 centre do; its report has its own name and eval.json and recall.png stay as they are."""
    run = tmp_path / "run"
    shutil.copytree(tiny_runs / "lpi", run)
    assert evaluate_main([str(run)]) == 0
    before = {name: (run / name).read_bytes() for name in ("eval.json", "recall.png")}
    recorded = load_state(run).results[-1]
    assert evaluate_main([str(run), "--key-centres", "5"]) == 0
    refit = json.loads((run / "eval-centres-5.json").read_text())
    assert refit["key_centres"] == 5 and "refit" in refit["keys"] and refit["routed"] is None
    assert refit["routing_accuracy_final"] == recorded["routing_accuracy"]
    assert refit["final"]["r1"] == recorded["r1"]
    assert evaluate_main([str(run), "--key-centres", "1"]) == 0
    one = json.loads((run / "eval-centres-1.json").read_text())
    assert one["final"]["r1"]["oracle"] == recorded["r1"]["oracle"], "oracle needs no keys"
    assert one["final"]["routing_confusion"] == _routing_confusion_at(run, 1)
    assert {name: (run / name).read_bytes() for name in before} == before
    with pytest.raises(SystemExit, match="2"):
        evaluate_main([str(run), "--key-centres", "0"])


def _routing_confusion_at(run, centres: int) -> dict:
    """Each task's test queries routed by keys fitted here with `centres` centres."""
    state = load_state(run)
    backbone = load_backbone(state.config.backbone)
    records = read_manifest(state.config.manifest)
    keys = TaskKeys(centres)
    for task in state.done:
        keys.add(task, *key_features(backbone, select(records, task, "train")))
    size = backbone.config.vision.image_size
    routed: dict = {"image": {}, "text": {}}
    for task in state.done:
        test = make_test_set(*eval_set(select(records, task, "test"), size))
        image, text = frozen_features(backbone, test)
        routed["image"][task] = keys.route_names(image, "image")
        routed["text"][task] = keys.route_names(text, "text")
    return {m: routing_confusion(rows) for m, rows in routed.items()}


def test_train_refuses_a_centre_count_below_one(tiny_runs, tmp_path):
    with pytest.raises(SystemExit, match="2"):
        train_main(_args(tiny_runs, tmp_path / "run", "--key-centres", "0"))
    assert not (tmp_path / "run").exists()


def test_pretraining_a_set_smaller_than_one_batch(tiny_runs, tmp_path):
    """drop_last never drops the only batch (it once made `python -m lpi.pretrain` divide by
    zero on 16 images with its default batch of 128)."""
    from lpi.pretrain import main as pretrain_main

    out = tmp_path / "pretrained.safetensors"
    code = pretrain_main(
        [
            "--manifest",
            str(tiny_runs / "data" / "pretrain.jsonl"),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "128",
        ]
    )
    assert code == 0
    assert lpi.load_backbone(out).config.vision.image_size == 32


def test_the_default_lr_is_the_sweeps_choice_per_method_and_is_recorded(tmp_path):
    """No --lr: each method gets the best rate the bench sweep found, and run.json says so."""
    from lpi.continual.methods import DENSE_LR, LPI_LR
    from lpi.continual.trainer import TrainConfig

    def config(method, **fields):
        return TrainConfig(
            manifest=tmp_path / "m", backbone="tiny", out=tmp_path, method=method, **fields
        )

    assert (config("dense").lr, config("dense").lr_source) == (DENSE_LR, "default for dense")
    for method in ("lpi", "lpi-no-interaction", "lpi-no-layer", "lpi-no-task", "shared"):
        assert (config(method).lr, config(method).lr_source) == (LPI_LR, f"default for {method}")
    assert (config("lpi", lr=0.5).lr, config("lpi", lr=0.5).lr_source) == (0.5, None)
