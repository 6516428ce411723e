"""`python -m lpi.sweep`: learning rates chosen on the val split, resumable, read by lpi.train."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from lpi.continual import sweep as sweep_module
from lpi.continual.data.manifest import read_manifest, write_manifest
from lpi.continual.run_state import load_state
from lpi.continual.sweep import SweepError, point_folder, run_sweep, val_score
from lpi.sweep import main as sweep_main
from lpi.train import main as train_main
from lpi.train import parse_args as train_args
from tests.train_helpers import tiny_train_config as _base


@pytest.fixture
def data(tiny_runs, tmp_path):
    """The tiny bundle's data with half of each task's test records moved to a val split."""
    folder = tmp_path / "data"
    shutil.copytree(tiny_runs / "data", folder)
    records = read_manifest(folder / "manifest.jsonl")
    count: dict[str, int] = {}
    moved = []
    for record in records:
        if record.split == "test":
            count[record.task] = count.get(record.task, 0) + 1
            if count[record.task] % 2:
                record = dataclasses.replace(record, split="val")
        moved.append(record)
    write_manifest(folder / "manifest.jsonl", moved)
    return folder


def test_sweep_scores_on_val_picks_the_best_and_resumes(tiny_runs, data, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    result = run_sweep(_base(tiny_runs, data, out), ["lpi", "dense"], [1e-2, 1e-1])
    assert json.loads((out / "sweep.json").read_text()) == result
    for method in ("lpi", "dense"):
        entry = result[method]
        assert set(entry["scores"]) == {"0.01", "0.1"}
        for point in entry["points"].values():
            state = load_state(out / point["run"])
            assert state.config.eval_split == "val" and state.config.lr == point["lr"]
            assert point["score"] == val_score(state)  # recomputed from the run's own record
            last = state.results[-1]["r1"]["oracle"]
            assert point["score"] == pytest.approx(sum(last.values()) / len(last), abs=1e-12)
        best = max(entry["scores"].values())
        assert entry["score"] == best
        assert entry["lr"] == min(p["lr"] for p in entry["points"].values() if p["score"] == best)
    # Resuming trains only the new point; finished ones are kept as they were.
    trained = []
    real = sweep_module.run_training
    monkeypatch.setattr(
        sweep_module, "run_training", lambda c, ctl: trained.append(c.lr) or real(c, ctl)
    )
    again = run_sweep(_base(tiny_runs, data, out), ["lpi"], [1e-2, 1e-1, 3e-2])
    assert trained == [3e-2]
    assert again["lpi"]["points"]["0.01"] == result["lpi"]["points"]["0.01"]
    assert set(again["lpi"]["scores"]) == {"0.01", "0.1", "0.03"}
    # The points' shared recipe is recorded; a rerun under another is refused before training.
    assert again["base_recipe"]["epochs"] == 1 and "lr" not in again["base_recipe"]
    with pytest.raises(SweepError, match=r"sweep\.json: .*base_recipe \(epochs 1 -> 2\)") as err:
        run_sweep(_base(tiny_runs, data, out, epochs=2), ["lpi"], [5e-2])
    assert str(out / "sweep.json") in str(err.value) and trained == [3e-2]


def test_point_folders_are_exact():
    """Two learning rates equal to 6 significant digits get their own run folders."""
    names = {point_folder(lr, std) for lr in (1e-3, 1.0000001e-3) for std in (None, 0.02)}
    assert len(names) == 4 and point_folder(1.0000001e-3, 0.02) == "lr0.0010000001-std0.02"
    assert all(set(name) <= set("lrstd0123456789.e+-") for name in names)


def test_ties_go_to_the_smaller_lr():
    points = {
        "0.1": {"lr": 0.1, "init_std": None, "score": 50.0, "run": "b"},
        "0.01": {"lr": 0.01, "init_std": None, "score": 50.0, "run": "a"},
        "0.3": {"lr": 0.3, "init_std": None, "score": 40.0, "run": "c"},
    }
    assert sweep_module._best(points)["lr"] == 0.01


def test_a_manifest_without_val_records_is_refused_before_training(tiny_runs, tmp_path):
    manifest = tiny_runs / "data" / "manifest.jsonl"
    config = _base(tiny_runs, tiny_runs / "data", tmp_path / "sweep")
    with pytest.raises(SweepError, match="no val records") as err:
        run_sweep(config, ["lpi"], [1e-2])
    assert str(manifest) in str(err.value)
    assert not (tmp_path / "sweep").exists()


def test_cli_sweep_then_train_with_lr_from(tiny_runs, data, tmp_path, caplog):
    common = ["--manifest", str(data / "manifest.jsonl")]
    common += ["--backbone", str(tiny_runs / "backbone.safetensors")]
    common += ["--layers", "2", "--tokens", "4", "--epochs", "1", "--batch-size", "8", "--cache"]
    out = tmp_path / "sweep"
    assert sweep_main([*common, "--out", str(out), "--methods", "dense", "--lrs", "0.05"]) == 0
    chosen = json.loads((out / "sweep.json").read_text())["dense"]
    assert chosen["lr"] == 0.05
    run = tmp_path / "run"
    args = [*common, "--out", str(run), "--method", "dense", "--lr-from", str(out / "sweep.json")]
    assert train_main(args) == 0
    saved = load_state(run).config
    assert saved.lr == 0.05 and str(out / "sweep.json") in saved.lr_source
    assert saved.eval_split == "test"
    # A method the sweep did not choose for: argparse's usage error, naming the file.
    with pytest.raises(SystemExit):
        train_args([*common, "--out", str(run), "--method", "lpi", "--lr-from", str(out / "x")])
    assert sweep_main([*common, "--out", str(tmp_path / "s2"), "--manifest", "/nonexistent"]) == 2


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        sweep_main(["--help"])
    text = capsys.readouterr().out
    assert "(default: ['lpi', 'dense'])" in text and "0.001, 0.003" in text
    with pytest.raises(SystemExit):
        train_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--similarity-from-descriptions" in text and "--lr-from" in text
    assert "--task-threshold TASK_THRESHOLD L_task targets Y = S > threshold" in text
    assert "(default: 0.5)" in text
