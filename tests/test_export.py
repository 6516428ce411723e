"""Task artifacts: round trip against the trained model, validation on read, the CLI.

Round-trip tolerance 1e-5 on unit-norm fp32 features: the artifact stores the folded factors
in float32, which reproduce the prefix to ~1e-7 relative; the rest is the same computation.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import export
import lpi
from export.__main__ import main as export_main
from export.artifact import content_version, tensors_digest
from export.importer import import_dense
from export.tasks import RunExportError, export_run
from lpi.continual.methods import new_prompts
from lpi.continual.run_state import load_state, load_task
from tests.conftest import CAPTIONS, random_pixels

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def backbone(tiny_runs):
    return lpi.load_backbone(tiny_runs / "backbone.safetensors")


@pytest.fixture(scope="module")
def exported(tiny_runs, backbone, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts")
    return out, export_run(tiny_runs / "lpi", backbone, out)


def _trained_bank(run, backbone):
    state = load_state(run)
    bank = lpi.PromptBank()
    for index, task in enumerate(state.done):
        module = new_prompts(state.config.method, state.config.prompt_config(), backbone)
        load_task(run, index, task, module)
        bank.add(task, module)
    return bank


@pytest.mark.parametrize("method", ["lpi", "dense"])
def test_round_trip_features_equal_the_trained_model(tiny_runs, backbone, method, tmp_path):
    artifacts = export_run(tiny_runs / method, backbone, tmp_path)
    bank = _trained_bank(tiny_runs / method, backbone)
    rows = [artifacts[1].name, None, artifacts[0].name, artifacts[1].name]
    pixels = random_pixels(backbone, len(rows), torch.Generator().manual_seed(5))
    tokens = lpi.tokenize(CAPTIONS)
    index = {a.name: i for i, a in enumerate(artifacts)}
    slots = torch.tensor([index[t] if t else -1 for t in rows])
    with torch.no_grad():
        image_prefix, text_prefix = lpi.batch_prefix([a.task_prefix() for a in artifacts], slots)
        trained_image, trained_text = bank.prefixes(backbone, rows)
        for got, want in (
            (
                backbone.encode_image(pixels, image_prefix),
                backbone.encode_image(pixels, trained_image),
            ),
            (backbone.encode_text(tokens, text_prefix), backbone.encode_text(tokens, trained_text)),
        ):
            assert (got - want).abs().max() <= TOLERANCE


def test_artifact_metadata_and_index(exported, backbone):
    out, artifacts = exported
    index = json.loads((out / "index.json").read_text())
    assert [e["task_id"] for e in index["tasks"]] == [a.task_id for a in artifacts]
    for artifact in artifacts:
        meta = artifact.meta
        assert meta["backbone_fingerprint"] == lpi.fingerprint(backbone)
        assert (meta["layers"], meta["tokens"], meta["width_image"]) == (2, 4, 64)
        assert meta["format_version"] == 1 and meta["prompt_version"] == meta["checksum"][:16]
        assert set(artifact.keys) == {"image", "text"}  # task keys travel with the task
        assert artifact.train and "A" in artifact.train
        assert meta["metrics"]["loss"], "training metrics are recorded"
    assert not list(out.glob(".*.tmp")), "no temporary file is left behind"


def test_prompt_version_is_the_content(exported, tiny_runs, backbone, tmp_path):
    """Exporting the same run again gives the same versions; other content, another one."""
    _, artifacts = exported
    again = export_run(tiny_runs / "lpi", backbone, tmp_path)
    assert [a.prompt_version for a in again] == [a.prompt_version for a in artifacts]
    assert artifacts[0].prompt_version != artifacts[1].prompt_version


def _rewrite(src, dst, edit_tensors=None, edit_meta=None, fix_checksum=True):
    """Copy an artifact with edited tensors or metadata (checksum and prompt version
    recomputed, as a writer would, unless asked)."""
    with safe_open(str(src), framework="pt") as handle:
        meta = {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    if fix_checksum:
        meta["checksum"] = tensors_digest(tensors)
        meta["prompt_version"] = content_version(meta["checksum"])
    save_file(tensors, str(dst), metadata={k: json.dumps(v) for k, v in meta.items()})
    return dst


def _nan(tensors):
    tensors["image.key_m"][0, 0, 0] = float("nan")


def _shape(tensors):
    tensors["text.value_u"] = tensors["text.value_u"][:, :2].contiguous()


def _drop(tensors):
    del tensors["image.value_m"]


def _version(meta):
    meta["format_version"] = 99


@pytest.mark.parametrize(
    ("edit_tensors", "edit_meta", "fix_checksum", "error", "message"),
    [
        (_nan, None, True, export.ArtifactValueError, "NaN or Inf in image.key_m"),
        (_shape, None, True, export.ArtifactShapeError, "text.value_u has shape"),
        (_drop, None, True, export.ArtifactShapeError, "missing tensors image.value_m"),
        (None, _version, True, export.ArtifactVersionError, "format version 99"),
        (_nan, None, False, export.ArtifactCorruptError, "checksum"),
    ],
)
def test_bad_artifacts_are_refused(
    exported, tmp_path, edit_tensors, edit_meta, fix_checksum, error, message
):
    _, artifacts = exported
    bad = _rewrite(
        artifacts[0].path, tmp_path / "bad.safetensors", edit_tensors, edit_meta, fix_checksum
    )
    with pytest.raises(error, match=message):
        export.read_artifact(bad)


def test_truncated_and_flipped_files_are_refused(exported, tmp_path):
    _, artifacts = exported
    data = artifacts[0].path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(export.ArtifactCorruptError, match="not a readable"):
        export.read_artifact(truncated)
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))
    with pytest.raises(export.ArtifactError):  # corrupt bytes: checksum or non-finite values
        export.read_artifact(flipped)


def test_backbone_mismatch_is_refused(exported, tiny_runs, tmp_path):
    _, artifacts = exported
    other = lpi.load_backbone("tiny", seed=99)
    with pytest.raises(export.BackboneMismatchError, match="re-export"):
        export.read_artifact(artifacts[0].path, other)
    with pytest.raises(export.BackboneMismatchError):
        export_run(tiny_runs / "lpi", other, tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists(), "nothing is written when the checks fail"


def test_missing_task_is_refused_before_writing(tiny_runs, backbone, tmp_path):
    with pytest.raises(RunExportError, match="not in the run"):
        export_run(tiny_runs / "lpi", backbone, tmp_path / "out", tasks=["no-such-task"])
    assert not (tmp_path / "out").exists()


def test_dense_import_round_trip(backbone, tmp_path):
    """Prompts trained elsewhere, per-layer layout: the artifact reproduces their prefix."""
    torch.manual_seed(4)
    prompts_v, prompts_t = torch.randn(2, 4, 64), torch.randn(2, 4, 64)
    source = tmp_path / "prompts.safetensors"
    save_file(
        {f"image.{j}": prompts_v[j] for j in range(2)}
        | {f"text.{j}": prompts_t[j] for j in range(2)},
        str(source),
    )
    artifact = import_dense(source, backbone, "Imported Task", tmp_path / "out")
    assert artifact.task_id == "imported-task" and artifact.keys == {}
    expected = lpi.task_prefix(backbone, prompts_v, prompts_t)
    got = artifact.task_prefix()
    with torch.no_grad():
        for name in ("image_keys", "image_values", "text_keys", "text_values"):
            want = getattr(expected, name)
            error = (getattr(got, name) - want).norm() / want.norm()
            assert error < 1e-5, name


def test_cli_exports_and_reports_errors(tiny_runs, tmp_path, capsys):
    backbone = str(tiny_runs / "backbone.safetensors")
    assert (
        export_main([str(tiny_runs / "lpi"), "--backbone", backbone, "--out", str(tmp_path / "a")])
        == 0
    )
    assert len(json.loads((tmp_path / "a" / "index.json").read_text())["tasks"]) == 2
    assert (
        export_main([str(tiny_runs / "lpi"), "--backbone", "tiny", "--out", str(tmp_path / "b")])
        == 2
    )  # another backbone: refused
    shutil.rmtree(tmp_path / "a")
    with pytest.raises(SystemExit):
        export_main(["--help"])
    assert "Subcommands" in capsys.readouterr().out
