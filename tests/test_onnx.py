"""ONNX towers vs torch (a fast path's slow twin): one graph per tower serves every task and none.

Tolerance on unit-norm float32 features: cosine >= 0.9999 per row and max |diff| <= 1e-4. The
graph runs torch's float32 arithmetic with onnxruntime's kernels and summation orders
(differences seen: ~3e-7); 1e-4 leaves room for other CPUs' kernels, while a wrong mask, layer
or scale moves features by 1e-2 or more. float16 graphs: cosine >= 0.999 per row
(the cross-backend bound).

One export of the tiny backbone (through the CLI function) serves the module: ~30 s of tracing.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch.onnx's dynamo exporter

import lpi
from export import onnx_export
from export.onnx_cli import add_onnx_arguments, run_onnx
from export.onnx_export import OnnxExportOptions
from export.onnx_runtime import OnnxManifestError, OnnxTowers, sha256_file
from tests.conftest import CAPTIONS, random_pixels, random_prompts

LAYERS, TOKENS = 3, 4  # random_prompts' shape
MIN_COSINE, MAX_DIFF = 0.9999, 1e-4
ROWS = {1: ["a"], 5: ["a", None, "b", "a", None]}  # tasks mixed with bare rows


def cli(*argv: str) -> argparse.Namespace:
    return add_onnx_arguments(argparse.ArgumentParser()).parse_args(list(argv))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny backbone (seed 0, as tiny_backbone) exported with its fp16 and int8 graphs."""
    out = tmp_path_factory.mktemp("onnx")
    argv = ("--backbone", "tiny", "--out", str(out), "--layers", "3", "--tokens", "4")
    code = run_onnx(cli(*argv, "--quantize", "int8"))
    assert code == 0
    return out


@pytest.fixture(scope="module")
def towers(exported, tiny_backbone):
    return OnnxTowers(exported, backbone=tiny_backbone, threads=1)


@pytest.fixture(scope="module")
def bank(tiny_backbone):
    bank = lpi.PromptBank()
    bank.add("a", random_prompts(tiny_backbone, seed=1))
    bank.add("b", random_prompts(tiny_backbone, seed=2, interaction=False))
    return bank


def texts(batch: int, trim: bool) -> torch.Tensor:
    """Ragged captions; trimmed to the batch's longest as the serving engine pads them."""
    ids = lpi.tokenize([CAPTIONS[(row * 3) % len(CAPTIONS)] for row in range(batch)])
    return ids[:, : int(ids.argmax(dim=-1).max()) + 1] if trim else ids


def assert_rows_match(got, want: torch.Tensor, min_cosine: float = MIN_COSINE, max_diff=MAX_DIFF):
    got = torch.as_tensor(got)
    cosine = F.cosine_similarity(got, want, dim=-1)
    assert cosine.min() >= min_cosine, cosine
    if max_diff is not None:
        assert (got - want).abs().max() <= max_diff


def prefix_args(prefix: lpi.Prefix) -> tuple:
    return prefix.keys, prefix.values, prefix.active


@pytest.mark.parametrize("batch", [1, 5])
def test_image_graph_equals_torch_per_row(towers, tiny_backbone, bank, generator, batch):
    pixels = random_pixels(tiny_backbone, batch, generator)
    image, _ = bank.prefixes(tiny_backbone, ROWS[batch])
    with torch.no_grad():
        want = tiny_backbone.encode_image(pixels, image)
    assert_rows_match(towers.encode_image(pixels, *prefix_args(image)), want)


@pytest.mark.parametrize("trim", [True, False], ids=["padded-to-longest", "full-context"])
@pytest.mark.parametrize("batch", [1, 5])
def test_text_graph_equals_torch_per_row(towers, tiny_backbone, bank, batch, trim):
    token_ids = texts(batch, trim)
    _, text = bank.prefixes(tiny_backbone, ROWS[batch])
    with torch.no_grad():
        want = tiny_backbone.encode_text(token_ids, text)
    assert_rows_match(towers.encode_text(token_ids, *prefix_args(text)), want)


def test_inactive_rows_equal_the_bare_backbone(towers, tiny_backbone, bank, generator):
    rows = ["b", None, "a", None, None]
    pixels, token_ids = random_pixels(tiny_backbone, 5, generator), texts(5, trim=True)
    image, text = bank.prefixes(tiny_backbone, rows)
    got_image = towers.encode_image(pixels, *prefix_args(image))
    got_text = towers.encode_text(token_ids, *prefix_args(text))
    bare = [row for row, task in enumerate(rows) if task is None]
    with torch.no_grad():
        assert_rows_match(got_image[bare], tiny_backbone.encode_image(pixels[bare]))
        assert_rows_match(got_text[bare], tiny_backbone.encode_text(token_ids[bare]))


def test_no_prefix_runs_the_bare_backbone_numpy_in_numpy_out(towers, tiny_backbone, generator):
    pixels, token_ids = random_pixels(tiny_backbone, 2, generator), texts(2, trim=True)
    got_image = towers.encode_image(pixels.numpy())
    got_text = towers.encode_text(token_ids.numpy())
    assert isinstance(got_image, np.ndarray) and got_image.dtype == np.float32
    with torch.no_grad():
        assert_rows_match(got_image, tiny_backbone.encode_image(pixels))
        assert_rows_match(got_text, tiny_backbone.encode_text(token_ids))


def test_manifest_names_backbone_shapes_files_and_checks(exported, tiny_backbone):
    manifest = json.loads((exported / "onnx.json").read_text())
    assert manifest["backbone"]["fingerprint"] == lpi.fingerprint(tiny_backbone)
    assert (manifest["layers"], manifest["tokens"]) == (LAYERS, TOKENS)
    assert manifest["widths"] == {"image": 64, "text": 64}
    for tower in ("image", "text"):
        check = manifest["checks"][tower]["float32"]
        assert check["passed"] and check["min_cosine"] >= MIN_COSINE and check["inactive_rows"]
        entry = manifest["files"][tower]["float32"]
        assert sha256_file(exported / entry["file"]) == entry["sha256"]
    assert not list(exported.glob(".*.tmp"))


def test_another_backbones_export_is_refused(exported):
    other = lpi.load_backbone("tiny", seed=1)
    with pytest.raises(OnnxManifestError, match="not from the given backbone"):
        OnnxTowers(exported, backbone=other)


def test_a_changed_graph_file_is_refused(exported, tmp_path):
    copy = shutil.copytree(exported, tmp_path / "copy")
    with open(copy / "text.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(OnnxManifestError, match="sha256"):
        OnnxTowers(copy)


def test_fp16_graphs_are_kept_when_they_hold(exported, tiny_backbone, bank, generator):
    """tiny's fp16 graphs hold (cosine ~0.9999995), so the export kept both."""
    manifest = json.loads((exported / "onnx.json").read_text())
    for tower in ("image", "text"):
        assert manifest["checks"][tower]["float16"]["kept"]
        assert (exported / manifest["files"][tower]["float16"]["file"]).is_file()
    half = OnnxTowers(exported, backbone=tiny_backbone, precision="float16", threads=1)
    pixels, token_ids = random_pixels(tiny_backbone, 5, generator), texts(5, trim=True)
    image, text = bank.prefixes(tiny_backbone, ROWS[5])
    with torch.no_grad():
        want_image = tiny_backbone.encode_image(pixels, image)
        want_text = tiny_backbone.encode_text(token_ids, text)
    # 0.999 per row across backends; fp16 rounding (~1e-3 relative) has no abs bound.
    got = half.encode_image(pixels, *prefix_args(image))
    assert_rows_match(got, want_image, min_cosine=0.999, max_diff=None)
    got = half.encode_text(token_ids, *prefix_args(text))
    assert_rows_match(got, want_text, min_cosine=0.999, max_diff=None)


def test_fp16_graph_that_does_not_hold_is_skipped_with_a_reason(
    tiny_backbone, tmp_path, monkeypatch, caplog
):
    monkeypatch.setitem(onnx_export.MIN_COSINE, "float16", 1.5)  # no graph can hold this
    with caplog.at_level(logging.WARNING, logger="export.onnx_export"):
        options = OnnxExportOptions(layers=3, tokens=4, opset=18)
        entry, check = onnx_export._try_fp16(tiny_backbone, "image", tmp_path, options)
    assert entry is None and not check["kept"] and "below 1.5" in check["reason"]
    assert "image.fp16.onnx skipped" in caplog.text
    assert list(tmp_path.iterdir()) == []  # no graph and no temp file left behind


def test_missing_fp16_graph_is_refused_with_the_export_reason(exported, tmp_path):
    copy = shutil.copytree(exported, tmp_path / "copy")
    manifest = json.loads((copy / "onnx.json").read_text())
    del manifest["files"]["image"]["float16"]
    manifest["checks"]["image"]["float16"] = {"kept": False, "reason": "cosine too low"}
    (copy / "onnx.json").write_text(json.dumps(manifest))
    OnnxTowers(copy, precision="float32")  # float32 still serves
    with pytest.raises(OnnxManifestError, match=r"no float16 image graph.*cosine too low"):
        OnnxTowers(copy, precision="float16")


def test_inputs_of_the_wrong_shape_are_refused(towers, tiny_backbone, generator):
    pixels = random_pixels(tiny_backbone, 2, generator)
    keys = torch.randn(LAYERS, 2, TOKENS, 64, generator=generator)
    with pytest.raises(ValueError, match="pixels must be"):
        towers.encode_image(pixels[:, :, :16])
    with pytest.raises(ValueError, match=r"prefix_keys must be \[J, B, N, D\]"):
        towers.encode_image(pixels, keys[:2], keys[:2])
    with pytest.raises(ValueError, match="given together"):
        towers.encode_image(pixels, keys)
    with pytest.raises(ValueError, match="active must be"):
        towers.encode_image(pixels, keys, keys, torch.tensor([True]))
    with pytest.raises(ValueError, match="need prefix_keys"):
        towers.encode_image(pixels, active=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="token_ids must be"):
        towers.encode_text(torch.ones(2, 78, dtype=torch.long))


def test_export_refuses_a_prompt_shape_the_backbone_cannot_take(tiny_backbone, tmp_path):
    with pytest.raises(ValueError, match=r"layers J=5 must lie in \[1, 4\]"):
        onnx_export.export_towers(tiny_backbone, tmp_path, layers=5, tokens=4)
    with pytest.raises(ValueError, match="opset 17"):
        onnx_export.export_towers(tiny_backbone, tmp_path, layers=2, tokens=4, opset=17)


def test_cli_help_names_every_option(capsys):
    """`python -m export onnx --help` reaches the ONNX subcommand's own options."""
    from export.__main__ import main as export_main

    with pytest.raises(SystemExit) as done:
        export_main(["onnx", "--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0
    options = ("--backbone", "--out", "--layers", "--tokens", "--opset", "--no-fp16", "--quantize")
    for option in (*options, "--exporter"):
        assert option in text


def test_cli_caps_layers_at_depth_and_forwards_no_fp16(monkeypatch, tmp_path):
    seen = {}

    def fake_export(backbone, out, layers, tokens, opset, fp16, quantize=None, exporter=None):
        seen.update(layers=layers, tokens=tokens, opset=opset, fp16=fp16, quantize=quantize)
        seen.update(exporter=exporter)
        return {"files": {"image": {}, "text": {}}}

    monkeypatch.setattr(onnx_export, "export_towers", fake_export)
    assert run_onnx(cli("--backbone", "tiny", "--out", str(tmp_path), "--no-fp16")) == 0
    assert seen == {
        "layers": 4,
        "tokens": 16,
        "opset": 18,
        "fp16": False,
        "quantize": None,
        "exporter": "torchscript",
    }


def test_cli_unknown_backbone_exits_2(tmp_path, caplog):
    assert run_onnx(cli("--backbone", str(tmp_path / "missing.pt"), "--out", str(tmp_path))) == 2
    assert "does not exist" in caplog.text


# ---------------------------------------------------------------------------------- int8


def test_int8_graphs_hold_their_cosine_bound_and_are_served_by_default(
    exported, tiny_backbone, bank, generator
):
    """Dynamic int8 (weights per channel): cosine >= 0.99 per row against torch float32 on
    fresh inputs, mixed with bare rows; no absolute bound (quantisation steps are ~1e-2 of a
    weight's range). `auto` serves int8 where the export holds it."""
    from export.onnx_runtime import pick_precision

    manifest = json.loads((exported / "onnx.json").read_text())
    for tower in ("image", "text"):
        check = manifest["checks"][tower]["int8"]
        assert (
            check["kept"] and check["min_cosine"] >= 0.99 and check["min_cosine_required"] == 0.99
        )
        entry = manifest["files"][tower]["int8"]
        assert sha256_file(exported / entry["file"]) == entry["sha256"]
    assert pick_precision(exported)[0] == "int8"
    int8 = OnnxTowers(exported, backbone=tiny_backbone, precision="int8", threads=1)
    pixels, token_ids = random_pixels(tiny_backbone, 5, generator), texts(5, trim=True)
    image, text = bank.prefixes(tiny_backbone, ROWS[5])
    with torch.no_grad():
        want_image = tiny_backbone.encode_image(pixels, image)
        want_text = tiny_backbone.encode_text(token_ids, text)
    got = int8.encode_image(pixels, *prefix_args(image))
    assert_rows_match(got, want_image, min_cosine=0.99, max_diff=None)
    got = int8.encode_text(token_ids, *prefix_args(text))
    assert_rows_match(got, want_text, min_cosine=0.99, max_diff=None)


def test_a_changed_int8_graph_or_another_backbone_is_refused(exported, tmp_path):
    copy = shutil.copytree(exported, tmp_path / "copy")
    with open(copy / "image.int8.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(OnnxManifestError, match="sha256"):
        OnnxTowers(copy, precision="int8")
    other = lpi.load_backbone("tiny", seed=1)
    with pytest.raises(OnnxManifestError, match="not from the given backbone"):
        OnnxTowers(exported, backbone=other, precision="int8")


def test_int8_graph_below_its_bound_is_refused(tiny_backbone, tmp_path, monkeypatch):
    """A quantised graph that misses its cosine bound is never installed, the manifest says
    why, the float32 graphs stay, and the export fails (the CLI exits 1)."""
    monkeypatch.setitem(onnx_export.MIN_COSINE, "int8", 1.5)  # no graph can hold this
    with pytest.raises(onnx_export.OnnxExportError, match="int8 graphs refused"):
        onnx_export.export_towers(tiny_backbone, tmp_path, 2, 4, fp16=False, quantize="int8")
    manifest = json.loads((tmp_path / "onnx.json").read_text())
    for tower in ("image", "text"):
        check = manifest["checks"][tower]["int8"]
        assert not check["kept"] and "below 1.5" in check["reason"]
        assert "int8" not in manifest["files"][tower]
        assert not (tmp_path / f"{tower}.int8.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.onnx", "onnx.json", "text.onnx"]
    code = run_onnx(
        cli(
            "--backbone",
            "tiny",
            "--out",
            str(tmp_path / "cli"),
            "--layers",
            "2",
            "--tokens",
            "4",
            "--no-fp16",
            "--quantize",
            "int8",
        )
    )
    assert code == 1
