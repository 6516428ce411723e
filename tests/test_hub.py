"""Backbones by name (lpi/hub.py): each name form, read offline from a Hugging Face cache that
the test builds in huggingface_hub's own layout (tests/hub_cache.py), loads exactly what the
path form loads. HF_HUB_OFFLINE=1: nothing here may reach the network. "The same weights"
is checked by lpi.fingerprint (architecture + every tensor, exact), against the path form
(the independent reference: lpi.checkpoint's readers, which predate the hub code).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lpi
from lpi import hub
from lpi.checkpoint import CheckpointError
from tests.hub_cache import cache_repo, offline_cache, tiny_weights

B32 = ("ViT-B-32:openai", "timm/vit_base_patch32_clip_224.openai")
B16 = ("ViT-B-16:laion2b_s34b_b88k", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    return offline_cache(tmp_path / "hf-cache", monkeypatch)


def _same(a: lpi.Backbone, b: lpi.Backbone) -> None:
    assert a.config == b.config
    assert lpi.fingerprint(a) == lpi.fingerprint(b)


@pytest.mark.parametrize(
    ("model", "file", "activation"),
    [
        (B32, "open_clip_pytorch_model.bin", "quick_gelu"),
        (B16, "open_clip_model.safetensors", "gelu"),  # LAION's ViT-B-16 has no QuickGELU
    ],
)
def test_pretrained_tags_load_the_files_they_name(cache, tmp_path, model, file, activation):
    (name, repo) = model
    path, data = tiny_weights(tmp_path, file, seed=1)
    cache_repo(cache, repo, {file: data})
    by_name = lpi.load_backbone(name)
    _same(by_name, lpi.load_backbone(path, activation=activation))
    assert by_name.config.activation == activation
    arch, tag = name.split(":")
    _same(by_name, lpi.load_backbone(f"{arch}:{tag.upper().replace('_', '-')}"))  # open_clip's


def test_quickgelu_alias_and_wide_heads(cache, tmp_path):
    """`ARCH-quickgelu:TAG` is open_clip's alias; ViT-H-14's image heads are 80 wide, not 64."""
    path, data = tiny_weights(tmp_path, "open_clip_model.safetensors", seed=2)
    cache_repo(cache, "timm/vit_base_patch32_clip_224.laion400m_e32", {path.name: data})
    _same(lpi.load_backbone("ViT-B-32-quickgelu:laion400m_e32"), lpi.load_backbone(path))
    tiny = lpi.load_preset("tiny").to_dict()
    config = lpi.ClipConfig.from_dict(
        tiny | {"activation": "gelu", "vision": tiny["vision"] | {"width": 160, "heads": 2}}
    )
    path, data = tiny_weights(tmp_path, "open_clip_pytorch_model.bin", seed=3, config=config)
    cache_repo(cache, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", {path.name: data})
    huge = lpi.load_backbone("ViT-H-14:laion2b_s32b_b79k")
    assert huge.config.vision.heads == 2  # 160 / 80; the weights alone would say 160 / 64 -> 2
    assert huge.config.text.heads == 1  # inferred: 64 / 64
    _same(huge, lpi.load_backbone(path, config=huge.config))


def test_hf_hub_open_clip_repository_uses_its_config(cache, tmp_path):
    """`hf-hub:ORG/NAME`: heads and activation come from open_clip_config.json."""
    config = lpi.load_preset("tiny")  # 2 heads of 32 per tower: not what width / 64 infers
    path, data = tiny_weights(tmp_path, "open_clip_pytorch_model.bin", seed=4)
    open_clip_config = {
        "model_cfg": {
            "embed_dim": 64,
            "quick_gelu": False,
            "vision_cfg": {"width": 64, "head_width": 32, "layers": 4, "patch_size": 8},
            "text_cfg": {"width": 64, "heads": 2, "layers": 4},
        },
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
        },
    }
    files = {path.name: data, "open_clip_config.json": json.dumps(open_clip_config).encode()}
    snapshot = cache_repo(cache, "acme/tiny-clip", files)
    expected = lpi.load_backbone(path, config=config, activation="gelu")
    _same(lpi.load_backbone("hf-hub:acme/tiny-clip"), expected)
    _same(lpi.load_backbone(f"hf-hub:acme/tiny-clip@{snapshot.name}"), expected)  # pinned
    _same(lpi.load_backbone("acme/tiny-clip"), expected)  # the prefix is optional


def test_clip_model_repository_id(cache, tmp_path):
    """A Hugging Face CLIPModel id loads what its folder loads (config.json's heads, GELU)."""
    transformers = pytest.importorskip("transformers")
    tower = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_act="gelu", **tower),
        vision_config=dict(hidden_act="gelu", image_size=32, patch_size=8, **tower),
        projection_dim=48,
    )
    torch.manual_seed(5)
    folder = tmp_path / "clip-folder"
    transformers.CLIPModel(config).save_pretrained(folder)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert "model.safetensors" in files and "config.json" in files
    cache_repo(cache, "acme/clip-vit-tiny", files)
    by_name = lpi.load_backbone("acme/clip-vit-tiny")
    _same(by_name, lpi.load_backbone(folder))
    assert by_name.config.vision.heads == 2 and by_name.config.activation == "gelu"


def _refused(name: str, *parts: str) -> str:
    with pytest.raises(CheckpointError) as caught:
        lpi.load_backbone(name)
    message = str(caught.value)
    assert "\n" not in message and name in message, message
    for part in parts:
        assert part in message, message
    return message


def test_unknown_names_and_tags(cache):
    _refused("ViT-Q-99:openai", "no architecture", "ViT-B-16")
    _refused("ViT-B-32:no_such_tag", "no pretrained tag", "laion2b_s34b_b79k")
    _refused("ViT-B-16-quickgelu:laion2b_s34b_b88k", "no pretrained tag")  # a GELU tag
    _refused("ViT-L-14:laion2b_s32b_b82k", "no pretrained tag")  # Inception mean/std: left out


def test_missing_offline_says_how_to_fetch(cache):
    message = _refused(B32[0], "not in the Hugging Face cache", "--allow-download")
    assert f"hf download {B32[1]} open_clip_model.safetensors" in message
    _refused("acme/nothing-here", "not in the Hugging Face cache")


def test_repositories_that_are_not_clip(cache, tmp_path):
    bert = {"model_type": "bert", "hidden_size": 64}
    cache_repo(
        cache,
        "acme/bert",
        {
            "config.json": json.dumps(bert).encode(),
            "model.safetensors": b"not read",
        },
    )
    _refused("acme/bert", "not a CLIP model", "'bert'")
    cache_repo(cache, "acme/readme-only", {"README.md": b"# nothing"})
    _refused("acme/readme-only", "not in the Hugging Face cache")
    path, data = tiny_weights(tmp_path, "open_clip_model.safetensors", seed=6)
    timm = {"model_cfg": {"vision_cfg": {"timm_model_name": "convnext_base"}, "text_cfg": {}}}
    cache_repo(
        cache,
        "acme/convnext",
        {
            path.name: data,
            "open_clip_config.json": json.dumps(timm).encode(),
        },
    )
    _refused("hf-hub:acme/convnext", "timm or Hugging Face towers")
    inception = {"model_cfg": {}, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    cache_repo(
        cache,
        "acme/inception",
        {
            path.name: data,
            "open_clip_config.json": json.dumps(inception).encode(),
        },
    )
    _refused("hf-hub:acme/inception", "other preprocessing")
    # open_clip weights of an unsupported tower: the reader's refusal, with the model named
    resnet = {
        "visual.layer1.0.conv1.weight": torch.zeros(1),
        "token_embedding.weight": torch.zeros(1),
    }
    save_file(resnet, str(tmp_path / "rn.safetensors"))
    cache_repo(cache, "acme/rn50", {path.name: (tmp_path / "rn.safetensors").read_bytes()})
    _refused("acme/rn50", "ResNet image towers")


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.lstat().st_size for p in sorted(root.rglob("*"))}


def test_truncated_or_interrupted_files_are_never_trusted(cache, tmp_path):
    """A damaged blob is named and left alone (offline nothing is rewritten); a download that
    never finished (`.incomplete`, no snapshot link) is not in the cache at all."""
    path, data = tiny_weights(tmp_path, "open_clip_model.safetensors", seed=7)
    snapshot = cache_repo(cache, B32[1], {path.name: data})
    blob = (snapshot / path.name).resolve()
    blob.write_bytes(data[: len(data) // 2])
    before = _tree(cache)
    _refused(B32[0], "does not match its hash", "allow a download")
    assert _tree(cache) == before  # nothing written, nothing that a later start would trust
    blob.write_bytes(data)  # repaired: the same cache now loads
    _same(lpi.load_backbone(B32[0]), lpi.load_backbone(path))

    repo = cache / "models--laion--CLIP-ViT-B-16-laion2B-s34B-b88K"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / (hashlib.sha256(data).hexdigest() + ".incomplete")).write_bytes(data[:100])
    _refused(B16[0], "not in the Hugging Face cache")


def test_a_local_path_wins_over_a_name(cache, tmp_path, monkeypatch):
    """`org/model` that exists on disk is a path: a name never shadows the operator's files."""
    path, _ = tiny_weights(tmp_path, "model.safetensors", seed=8)
    (tmp_path / "acme").mkdir()
    os.replace(path, tmp_path / "acme" / "weights.safetensors")
    monkeypatch.chdir(tmp_path)
    assert lpi.checkpoint.source_kind("acme/weights.safetensors") == "path"
    assert lpi.checkpoint.source_kind("acme/other") == "hub"
    assert lpi.checkpoint.source_kind("tiny") == "preset"
    assert lpi.checkpoint.source_kind("ViT-B-16:openai") == "hub"
    assert lpi.checkpoint.source_kind("ViT-B-16") == "preset"


def test_resolving_imports_nothing_heavy_and_describes_the_snapshot(cache, tmp_path):
    path, data = tiny_weights(tmp_path, "open_clip_model.safetensors", seed=9)
    snapshot = cache_repo(cache, B32[1], {path.name: data})
    resolved = hub.resolve(B32[0])
    assert resolved.path == snapshot / path.name and resolved.revision == snapshot.name
    assert hub.describe(resolved) == f"{B32[1]}@{snapshot.name[:12]} ({B32[0]})"
    code = "import lpi, sys; print('huggingface_hub' in sys.modules, 'open_clip' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr  # imported only when resolving


MALFORMED_CONFIGS = {
    "top level a list": ([], "top level must be an object"),
    "model_cfg a string": ({"model_cfg": "ViT-B-32"}, "model_cfg must be an object"),
    "vision_cfg a list": ({"model_cfg": {"vision_cfg": [64]}}, "vision_cfg must be an object"),
    "text_cfg null": ({"model_cfg": {"text_cfg": None}}, "text_cfg must be an object"),
    "preprocess_cfg a string": ({"preprocess_cfg": "openai"}, "preprocess_cfg must be an"),
    "head_width a word": ({"model_cfg": {"vision_cfg": {"head_width": "abc"}}}, "head_width"),
    "head_width null": ({"model_cfg": {"vision_cfg": {"head_width": None}}}, "head_width"),
    "head_width zero": ({"model_cfg": {"vision_cfg": {"head_width": 0}}}, "head_width"),
    "head_width true": ({"model_cfg": {"vision_cfg": {"head_width": True}}}, "head_width"),
    "heads a fraction": ({"model_cfg": {"text_cfg": {"heads": 2.5}}}, "text_cfg.heads"),
    "heads negative": ({"model_cfg": {"text_cfg": {"heads": -2}}}, "text_cfg.heads"),
    "mean a string": ({"preprocess_cfg": {"mean": "abc"}}, "other preprocessing"),
    "mean with a word": ({"preprocess_cfg": {"mean": [0.48, "x", 0.41]}}, "other preprocessing"),
    "std a number": ({"preprocess_cfg": {"std": 0.27}}, "other preprocessing"),
    "std null": ({"preprocess_cfg": {"std": None}}, "other preprocessing"),
    "resize a list": ({"preprocess_cfg": {"resize_mode": ["x"]}}, "other preprocessing"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_CONFIGS))
def test_a_malformed_open_clip_config_is_a_checkpoint_error(cache, tmp_path, case):
    """Whatever open_clip_config.json holds, a bad value is a CheckpointError naming it, never
    a bare ValueError, TypeError or AttributeError."""
    config, expected = MALFORMED_CONFIGS[case]
    path, data = tiny_weights(tmp_path, "open_clip_model.safetensors", seed=7)
    cache_repo(
        cache,
        "acme/malformed",
        {
            path.name: data,
            "open_clip_config.json": json.dumps(config).encode(),
        },
    )
    _refused("hf-hub:acme/malformed", expected)


def test_integral_json_numbers_are_head_counts(cache, tmp_path):
    """64.0 is how some writers spell 64: read as the integer, the model loads."""
    path, data = tiny_weights(tmp_path, "open_clip_model.safetensors", seed=7)
    config = {"model_cfg": {"vision_cfg": {"head_width": 32.0}, "text_cfg": {"heads": 2.0}}}
    cache_repo(
        cache,
        "acme/floats",
        {
            path.name: data,
            "open_clip_config.json": json.dumps(config).encode(),
        },
    )
    resolved = hub.resolve("hf-hub:acme/floats")
    assert (resolved.vision_head_width, resolved.text_heads) == (32, 2)
    assert type(resolved.vision_head_width) is int and type(resolved.text_heads) is int
