"""Hugging Face `CLIPModel` folders against transformers itself (lpi/hf_convert.py).

Tolerance: max abs diff <= 1e-5 on unit-norm fp32 features. transformers computes the same
function with separate q/k/v projections and its own attention kernel, so the two agree to fp32
rounding (about 1e-6 for two layers); a wrong rename, transpose or activation moves features by
1e-2 or more.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lpi
from lpi.checkpoint import CheckpointError
from tests.conftest import CAPTIONS

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-5
PROJECTION_DIM = 48  # unlike the widths, so a transposed projection cannot load


def _hf_model(activation: str) -> torch.nn.Module:
    """A tiny CLIPModel (2 heads, so the folder's config, not width // 64, must be used)."""
    tower = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_act=activation, **tower),
        vision_config=dict(hidden_act=activation, image_size=32, patch_size=8, **tower),
        projection_dim=PROJECTION_DIM,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero biases and unit LayerNorms would hide swapped parameters
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    return model.eval()


def _features(output) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; 4.x a tensor."""
    pooled = output if isinstance(output, torch.Tensor) else output.pooler_output
    return F.normalize(pooled, dim=-1)


def _max_diff(ours: lpi.Backbone, hf: torch.nn.Module, seed: int) -> float:
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    tokens = lpi.tokenize(CAPTIONS)
    with torch.no_grad():
        image = _features(hf.get_image_features(pixel_values=pixels))
        text = _features(hf.get_text_features(input_ids=tokens))
        image_diff = (ours.encode_image(pixels) - image).abs().max().item()
        text_diff = (ours.encode_text(tokens) - text).abs().max().item()
    return max(image_diff, text_diff)


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def saved(request, tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    model = _hf_model(request.param)
    folder = tmp_path_factory.mktemp(f"clip-{request.param}")
    model.save_pretrained(folder)
    return model, folder


def test_folder_gives_transformers_features(saved):
    hf, folder = saved
    ours = lpi.load_backbone(folder)
    assert (folder / "model.safetensors").exists()
    assert ours.config.activation == hf.config.text_config.hidden_act
    assert ours.config.vision.heads == 2 and ours.config.embed_dim == PROJECTION_DIM
    assert _max_diff(ours, hf, seed=0) <= TOLERANCE


def _copy_config(folder: Path, target: Path, edit=None) -> None:
    config = json.loads((folder / "config.json").read_text())
    if edit:
        edit(config)
    (target / "config.json").write_text(json.dumps(config))


def test_pytorch_model_bin_folder(saved, tmp_path):
    """The pickle layout of `save_pretrained(safe_serialization=False)`. transformers 5 ignores
    that flag and writes safetensors, so the .bin is written as 4.x did: torch.save(state)."""
    hf, _ = saved
    hf.save_pretrained(tmp_path, safe_serialization=False)
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    assert _max_diff(lpi.load_backbone(tmp_path), hf, seed=1) <= TOLERANCE


def _only_non_defaults(config: dict) -> None:
    """What transformers 4.x wrote: fields equal to CLIP's defaults left out."""
    defaults = {
        "text_config": transformers.CLIPTextConfig().to_dict(),
        "vision_config": transformers.CLIPVisionConfig().to_dict(),
    }
    for tower, default in defaults.items():
        config[tower] = {k: v for k, v in config[tower].items() if default.get(k) != v}
    if config.get("projection_dim") == 512:
        del config["projection_dim"]


def test_config_with_only_non_default_fields(saved, tmp_path):
    hf, folder = saved
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    _copy_config(folder, tmp_path, _only_non_defaults)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "vocab_size" not in written["text_config"]  # the defaults really are left out
    assert _max_diff(lpi.load_backbone(tmp_path), hf, seed=2) <= TOLERANCE


def test_config_dict_entries_win(saved, tmp_path):
    """Old CLIP configs carry `text_config_dict`; transformers lets it override text_config."""
    hf, folder = saved

    def stale_text_config(config: dict) -> None:
        config["text_config_dict"] = {"num_attention_heads": 2}
        config["text_config"]["num_attention_heads"] = 4  # stale; a 4-head model is wrong

    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    _copy_config(folder, tmp_path, stale_text_config)
    ours = lpi.load_backbone(tmp_path)
    assert ours.config.text.heads == 2
    assert _max_diff(ours, hf, seed=3) <= TOLERANCE


def test_legacy_eos_token_id_is_accepted(saved, tmp_path):
    """eos_token_id 2 (configs before transformers 4.31) means argmax pooling, as lpi does."""
    hf, folder = saved
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    _copy_config(folder, tmp_path, lambda c: c["text_config"].update(eos_token_id=2))
    assert _max_diff(lpi.load_backbone(tmp_path), hf, seed=4) <= TOLERANCE


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda c: c["text_config"].update(eos_token_id=7),
            "eos_token_id 7 is neither 2 .* nor the end-of-text id 49407",
        ),
        (
            lambda c: c["vision_config"].update(hidden_act="gelu_new"),
            "unsupported hidden_act",
        ),
        (
            lambda c: c["vision_config"].update(layer_norm_eps=1e-6),
            "layer_norm_eps differ",
        ),
        (
            lambda c: c["vision_config"].update(image_size=[32, 64]),
            r"image_size \[32, 64\] is not square",
        ),
    ],
    ids=["eos", "activation", "eps", "non_square"],
)
def test_unsupported_configs_are_refused(saved, tmp_path, edit, match):
    _, folder = saved
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    _copy_config(folder, tmp_path, edit)
    with pytest.raises(CheckpointError, match=f"not a supported CLIPModel .*{match}"):
        lpi.load_backbone(tmp_path)


def test_config_json_that_is_not_json(saved, tmp_path):
    _, folder = saved
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    (tmp_path / "config.json").write_text("{truncated")
    with pytest.raises(CheckpointError, match="not a supported CLIPModel"):
        lpi.load_backbone(tmp_path)
