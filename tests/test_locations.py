"""Where runtime files go, and where an ONNX export's J and N come from.

The data directory: the checkout's data/ inside a checkout, the per-user folder elsewhere, a
one-line refusal for a folder that cannot be written. `python -m export onnx`: J and N from a
run, an artifact or the demo bundle, checked against the backbone and against --layers/--tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import lpi
from export import write_artifact
from export.onnx_cli import add_onnx_arguments, run_onnx
from export.onnx_shape import demo_root_of, from_artifact, from_run
from server.locations import APP, default_data_home
from tests.conftest import random_prompts

ROOT = Path(__file__).resolve().parents[1]


def test_data_dir_is_the_checkouts_inside_one(tmp_path):
    inside = ROOT / "docs"
    home = default_data_home(cwd=inside, env={"XDG_DATA_HOME": str(tmp_path)})
    assert home.path == ROOT / "data" and "checkout" in home.reason


def test_data_dir_is_per_user_outside_a_checkout(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "something-else"\n')
    home = default_data_home(cwd=tmp_path, env={"XDG_DATA_HOME": str(tmp_path / "xdg")})
    assert home.path == tmp_path / "xdg" / APP and "per-user" in home.reason
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for env in ({}, {"XDG_DATA_HOME": "relative/dir"}):  # relative: ignored, as XDG says
        home = default_data_home(cwd=tmp_path, env=env)
        assert home.path == tmp_path / "home" / ".local" / "share" / APP


def test_an_unwritable_data_dir_is_one_line_naming_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "--data-dir",
            str(blocker / "data"),
            "--port",
            "0",
            "--log-format",
            "text",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(blocker / "data") in lines[0] and "writable" in lines[0]


def _cli(*argv: str) -> argparse.Namespace:
    return add_onnx_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def _backbone_and_artifact(tmp_path: Path) -> tuple[Path, Path]:
    backbone = lpi.load_backbone("tiny", seed=0)
    lpi.save_backbone(backbone, tmp_path / "backbone.safetensors")
    prompts = random_prompts(backbone, 0, interaction=False, layers=2, tokens=3)
    artifact = tmp_path / "t.safetensors"
    write_artifact(artifact, "t", lpi.fold_task(backbone, prompts), backbone)
    return tmp_path / "backbone.safetensors", artifact


def test_export_shape_from_an_artifact_and_a_run(tmp_path):
    backbone_file, artifact = _backbone_and_artifact(tmp_path)
    shape = from_artifact(artifact)
    assert (shape.layers, shape.tokens) == (2, 3)
    run = tmp_path / "run"
    run.mkdir()
    config = {
        "method": "lpi",
        "manifest": "m.jsonl",
        "backbone": str(backbone_file),
        "backbone_fingerprint": shape.fingerprint,
        "tasks": ["t"],
        "prompt": {"layers": 2, "tokens": 3, "rank": 4},
        "epochs": 1,
        "batch_size": 8,
        "lr": 0.01,
        "weight_decay": 0.0,
        "seed": 0,
    }
    (run / "run.json").write_text(json.dumps({"config": config}))
    from_run_shape = from_run(run)
    assert (from_run_shape.layers, from_run_shape.tokens) == (2, 3)
    assert from_run_shape.backbone == str(backbone_file)  # used when --backbone is absent


def test_export_refuses_a_shape_or_backbone_its_source_contradicts(tmp_path, caplog):
    backbone_file, artifact = _backbone_and_artifact(tmp_path)
    out = tmp_path / "onnx"
    code = run_onnx(
        _cli(
            "--backbone",
            str(backbone_file),
            "--artifact",
            str(artifact),
            "--tokens",
            "16",
            "--out",
            str(out),
        )
    )
    assert code == 2 and "--tokens 16 contradicts" in caplog.text
    other = lpi.load_backbone("tiny", seed=1)
    lpi.save_backbone(other, tmp_path / "other.safetensors")
    code = run_onnx(
        _cli(
            "--backbone",
            str(tmp_path / "other.safetensors"),
            "--artifact",
            str(artifact),
            "--out",
            str(out),
        )
    )
    assert code == 2 and "made for backbone" in caplog.text
    assert not out.exists()  # refused before any graph was traced


def test_a_demo_bundles_backbone_is_recognised(tmp_path):
    content = tmp_path / "demo" / "demo-1234"
    content.mkdir(parents=True)
    (content / "backbone.safetensors").write_bytes(b"x")
    manifest = {"format": "lpi-demo-bundle", "backbone": "demo-1234/backbone.safetensors"}
    (tmp_path / "demo" / "bundle.json").write_text(json.dumps(manifest))
    assert demo_root_of(str(content / "backbone.safetensors")) == (tmp_path / "demo").resolve()
    (tmp_path / "elsewhere.safetensors").write_bytes(b"x")
    assert demo_root_of(str(tmp_path / "elsewhere.safetensors")) is None
    assert demo_root_of("tiny") is None
