"""An ONNX export's manifest is checked before anything is read from it (export/onnx_manifest.py):
a malformed one is an OnnxManifestError naming what is wrong, never a KeyError, and a file entry
never leads outside the export folder, whatever sha256 the same manifest gives it. No graph is
built: sessions are stubbed, since every refusal here comes before a session would open."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

import export.onnx_runtime as runtime
from export.onnx_manifest import contained, is_plain_name
from export.onnx_runtime import OnnxManifestError, OnnxTowers, read_manifest

FINGERPRINT = "ab" * 32


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest(files: dict[str, bytes]) -> dict:
    """The exporter's manifest shape (export.onnx_export._manifest), for float32 graphs."""
    return {
        "format": runtime.FORMAT,
        "version": runtime.FORMAT_VERSION,
        "backbone": {"fingerprint": FINGERPRINT, "config": {}},
        "layers": 2,
        "tokens": 4,
        "widths": {"image": 64, "text": 64},
        "embed_dim": 32,
        "image_size": 32,
        "context_length": 77,
        "vocab_size": 49408,
        "opset": 17,
        "inputs": {t: list(runtime.INPUTS[t]) for t in runtime.TOWERS},
        "output": runtime.OUTPUT,
        "files": {
            t: {"float32": {"file": f"{t}.onnx", "sha256": _sha(files[f"{t}.onnx"])}}
            for t in runtime.TOWERS
        },
        "checks": {t: {"float32": {"kept": True}} for t in runtime.TOWERS},
    }


@pytest.fixture
def folder(tmp_path) -> tuple[Path, dict]:
    """An export folder with stand-in graph files and its manifest (written by `_write`)."""
    root = tmp_path / "export"
    root.mkdir()
    files = {"image.onnx": b"image graph", "text.onnx": b"text graph"}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root, _manifest(files)


def _write(root: Path, manifest: dict) -> None:
    (root / runtime.MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def sessions(monkeypatch) -> list[Path]:
    """The paths OnnxTowers would open (no onnxruntime session is made)."""
    opened: list[Path] = []

    class Session:
        def get_providers(self):
            return ["CPUExecutionProvider"]

    def new_session(path, providers, threads=None):
        opened.append(Path(path))
        return Session()

    monkeypatch.setattr(runtime, "new_session", new_session)
    return opened


def test_a_well_formed_manifest_opens_its_two_graphs(folder, sessions):
    root, manifest = folder
    _write(root, manifest)
    towers = OnnxTowers(root, fingerprint=FINGERPRINT, providers=["CPUExecutionProvider"])
    assert sessions == [root / "image.onnx", root / "text.onnx"]
    assert (towers.layers, towers.tokens) == (2, 4)


def _without(path: str):
    def edit(manifest: dict) -> None:
        *parents, last = path.split(".")
        target = manifest
        for key in parents:
            target = target[key]
        del target[last]

    return edit


def _set(path: str, value):
    def edit(manifest: dict) -> None:
        *parents, last = path.split(".")
        target = manifest
        for key in parents:
            target = target[key]
        target[last] = value

    return edit


MALFORMED = {
    "no backbone fingerprint": (_without("backbone.fingerprint"), "backbone.fingerprint"),
    "no backbone": (_without("backbone"), "backbone.fingerprint"),
    "fingerprint a number": (_set("backbone.fingerprint", 7), "backbone.fingerprint"),
    "no files": (_without("files"), "files must be an object"),
    "no text files": (_without("files.text"), "files.text"),
    "an entry a string": (_set("files.image.float32", "image.onnx"), "files.image.'float32'"),
    "no file name": (_without("files.image.float32.file"), ".file must be a plain file name"),
    "no sha256": (_without("files.text.float32.sha256"), ".sha256 must be"),
    "no layers": (_without("layers"), "layers must be a positive integer"),
    "tokens a string": (_set("tokens", "4"), "tokens must be a positive integer"),
    "layers true": (_set("layers", True), "layers must be a positive integer"),
    "widths a list": (_set("widths", [64, 64]), "widths must hold"),
    "no vocab size": (_without("vocab_size"), "vocab_size"),
    "no checks": (_without("checks"), "checks must be an object"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_manifest_is_refused_naming_the_field(folder, sessions, case):
    root, manifest = folder
    edit, expected = MALFORMED[case]
    edited = copy.deepcopy(manifest)
    edit(edited)
    _write(root, edited)
    with pytest.raises(OnnxManifestError, match=re.escape(expected)):
        read_manifest(root)
    with pytest.raises(OnnxManifestError):
        OnnxTowers(root, fingerprint=FINGERPRINT, providers=["CPUExecutionProvider"])
    assert sessions == []


@pytest.mark.parametrize("kind", ["parent", "absolute", "nested", "backslash", "dot-dot"])
def test_a_file_entry_never_leads_outside_the_folder(folder, sessions, kind):
    """The outside file's own sha256 in the manifest: the hash cannot vouch for a path."""
    root, manifest = folder
    outside = root.parent / "outside.onnx"
    outside.write_bytes(b"not this export's graph")
    name = {
        "parent": "../outside.onnx",
        "absolute": str(outside),
        "nested": "sub/image.onnx",
        "backslash": "..\\outside.onnx",
        "dot-dot": "..",
    }[kind]
    manifest["files"]["image"]["float32"] = {"file": name, "sha256": _sha(outside.read_bytes())}
    _write(root, manifest)
    with pytest.raises(OnnxManifestError, match="plain file name"):
        OnnxTowers(root, fingerprint=FINGERPRINT, providers=["CPUExecutionProvider"])
    assert sessions == []


def test_a_symlink_out_of_the_folder_is_refused(folder, sessions):
    root, manifest = folder
    outside = root.parent / "outside.onnx"
    outside.write_bytes(b"image graph")  # the very bytes the manifest's sha256 names
    (root / "image.onnx").unlink()
    os.symlink(outside, root / "image.onnx")
    _write(root, manifest)
    with pytest.raises(OnnxManifestError, match="outside the export folder"):
        OnnxTowers(root, fingerprint=FINGERPRINT, providers=["CPUExecutionProvider"])
    assert sessions == []


def test_a_manifest_that_is_not_an_object_is_refused(folder):
    root, manifest = folder
    _write(root, [manifest])
    with pytest.raises(OnnxManifestError, match="JSON object"):
        read_manifest(root)


def test_plain_names_and_containment(tmp_path):
    assert is_plain_name("image.fp16.onnx") and is_plain_name("text.int8.onnx")
    for bad in ("", ".", "..", "a/b", "/abs", "a\\b", "c:x", "a\0b", "x" * 256, None, 3):
        assert not is_plain_name(bad), bad
    (tmp_path / "inside").mkdir()
    (tmp_path / "inside" / "a.onnx").write_bytes(b"")
    (tmp_path / "inside" / "loop").symlink_to("loop")
    assert contained(tmp_path / "inside", "a.onnx") == tmp_path / "inside" / "a.onnx"
    assert contained(tmp_path / "inside", "loop") is None


@pytest.mark.parametrize("listed", ["../outside.safetensors", "/etc/hostname", "link"])
def test_a_demo_bundle_never_lists_a_file_outside_itself(tmp_path, listed):
    """`--demo`: a bundle's backbone or artifact entry that leads out of it is refused before
    anything is read from it."""
    from export.onnx_shape import DEMO_FORMAT, DEMO_MANIFEST, ShapeSourceError, from_demo

    root = tmp_path / "demo"
    root.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"not this bundle's")
    (root / "link").symlink_to(tmp_path / "outside.safetensors")
    bundle = {"format": DEMO_FORMAT, "backbone": listed, "artifacts": {}}
    (root / DEMO_MANIFEST).write_text(json.dumps(bundle))
    with pytest.raises(ShapeSourceError, match="outside the bundle"):
        from_demo(root)
