"""Checkpoint formats, architecture inference and refusals (lpi/checkpoint.py).

Every format is loaded and compared with the open_clip model it was written from, on fresh
random inputs. Tolerance: max abs diff <= 1e-5 on unit-norm fp32 features. Both sides run the
same operations in a different order (fused MHA vs SDPA, batched vs separate q/k/v), which leaves
fp32 rounding of about 1e-6 after two layers; a wrong weight, layout or activation moves features
by 1e-2 or more (the override tests below check that such a model is indeed that far off).
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import lpi
from lpi.checkpoint import CheckpointError, infer_config
from tests.conftest import CAPTIONS

open_clip = pytest.importorskip("open_clip", reason="open_clip imports only beside torchvision")

TOLERANCE = 1e-5
# A model with a wrong head count or activation differs by far more than rounding.
WRONG_MODEL_GAP = 1e-3
EMBED_DIM = 48  # unlike the widths (64), so a transposed projection cannot load


def _open_clip_model(heads: int = 1, quick_gelu: bool = True) -> torch.nn.Module:
    """A tiny open_clip CLIP; heads=1 is what width 64 // 64 infers."""
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=EMBED_DIM,
        vision_cfg=open_clip.model.CLIPVisionCfg(
            layers=2, width=64, head_width=64 // heads, patch_size=8, image_size=32
        ),
        text_cfg=open_clip.model.CLIPTextCfg(
            context_length=77, vocab_size=49408, width=64, heads=heads, layers=2
        ),
        quick_gelu=quick_gelu,
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # open_clip zero-initialises biases and sets LN to 1/0: perturb all
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    return model.eval()


def _config(heads: int, activation: str = "quick_gelu") -> lpi.ClipConfig:
    tower = dict(width=64, layers=2, heads=heads)
    return lpi.ClipConfig(
        embed_dim=EMBED_DIM,
        vision=lpi.VisionConfig(image_size=32, patch_size=8, **tower),
        text=lpi.TextConfig(context_length=77, vocab_size=49408, **tower),
        activation=activation,
    )


def _max_diff(ours: lpi.Backbone, reference: torch.nn.Module, seed: int = 0) -> float:
    """Largest feature difference over random pixels and real captions."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(3, 3, 32, 32, generator=generator)
    tokens = lpi.tokenize(CAPTIONS)
    with torch.no_grad():
        ref_image = F.normalize(reference.encode_image(pixels), dim=-1)
        ref_text = F.normalize(reference.encode_text(tokens), dim=-1)
        image_diff = (ours.encode_image(pixels) - ref_image).abs().max().item()
        text_diff = (ours.encode_text(tokens) - ref_text).abs().max().item()
    return max(image_diff, text_diff)


def _refused(path: Path | str, match: str, **kwargs) -> None:
    with pytest.raises(CheckpointError, match=match):
        lpi.load_backbone(path, **kwargs)


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return _open_clip_model()


@pytest.fixture(scope="module")
def state(reference) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in reference.state_dict().items()}


def _write_torchscript(model: torch.nn.Module, path: Path) -> None:
    """An archive shaped like OpenAI's: traced code plus three configuration buffers."""
    model = copy.deepcopy(model)
    for name, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
        model.__dict__.pop(name, None)  # open_clip keeps two of them as plain ints
        model.register_buffer(name, torch.tensor(value))
    inputs = {
        "encode_image": torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)),
        "encode_text": lpi.tokenize(["a photo"]),
    }
    with warnings.catch_warnings():  # tracer and jit deprecation warnings
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace_module(model, inputs, check_trace=False), str(path))


WRITERS = {
    "pt": lambda state, folder: _torch_save(state, folder / "model.pt"),
    "pth": lambda state, folder: _torch_save(state, folder / "model.pth"),
    "bin": lambda state, folder: _torch_save(state, folder / "open_clip_pytorch_model.bin"),
    "safetensors": lambda state, folder: _safetensors(state, folder / "model.safetensors"),
    "nested_module_prefix": lambda state, folder: _torch_save(
        {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
        folder / "epoch_3.pt",
    ),
}


def _torch_save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _safetensors(state: dict, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_state_dict_formats_give_open_clips_features(fmt, reference, state, tmp_path):
    """The architecture is inferred from the weights alone (no config=) and matches exactly."""
    path = WRITERS[fmt](state, tmp_path)
    ours = lpi.load_backbone(path)
    assert ours.config == _config(heads=1)
    assert _max_diff(ours, reference, seed=3) <= TOLERANCE


def test_fp16_weights_load_into_fp32(reference, state, tmp_path):
    """OpenAI ships fp16 weights; they are widened, equal to the rounded fp32 model."""
    path = _torch_save({k: v.half() for k, v in state.items()}, tmp_path / "half.pt")
    rounded = copy.deepcopy(reference)
    with torch.no_grad():
        for param in rounded.parameters():
            param.copy_(param.half().float())
    ours = lpi.load_backbone(path)
    assert next(ours.parameters()).dtype == torch.float32
    assert _max_diff(ours, rounded, seed=4) <= TOLERANCE


def test_torchscript_archive_is_detected_and_loads(reference, tmp_path, caplog):
    """OpenAI's TorchScript layout: the configuration buffers and mask are dropped."""
    path = tmp_path / "ViT-tiny.pt"
    _write_torchscript(reference, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        archived = set(torch.jit.load(str(path)).state_dict())
    assert {"input_resolution", "context_length", "vocab_size", "attn_mask"} <= archived
    with caplog.at_level(logging.INFO, logger="lpi.checkpoint"):
        ours = lpi.load_backbone(path)
    assert "reading TorchScript archive" in caplog.text
    assert _max_diff(ours, reference, seed=5) <= TOLERANCE


def test_plain_state_dict_is_not_read_as_torchscript(state, tmp_path, caplog):
    path = _torch_save(state, tmp_path / "plain.pt")
    with caplog.at_level(logging.INFO, logger="lpi.checkpoint"):
        lpi.load_backbone(path)
    assert "TorchScript" not in caplog.text


def test_save_backbone_round_trip_keeps_config_and_weights(tmp_path):
    """The stored config wins over inference: tiny has 2 heads where width // 64 gives 1."""
    model = lpi.load_backbone("tiny", seed=7)
    path = lpi.save_backbone(model, tmp_path / "tiny.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors"]  # no temp left
    loaded = lpi.load_backbone(path)
    assert loaded.config == model.config and loaded.config.vision.heads == 2
    assert lpi.fingerprint(loaded) == lpi.fingerprint(model)
    tokens = lpi.tokenize(CAPTIONS)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():  # same weights, same code, same inputs: bit-identical
        assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))
        assert torch.equal(loaded.encode_image(pixels), model.encode_image(pixels))


def test_save_backbone_refuses_a_name_the_loader_would_misread(tmp_path):
    with pytest.raises(CheckpointError, match=r"name it \*\.safetensors"):
        lpi.save_backbone(lpi.load_backbone("tiny"), tmp_path / "tiny.pt")


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16", "ViT-L-14"])
def test_inference_recovers_openai_shapes(name):
    """Shapes only, so the model is built on the meta device: no memory, no init cost."""
    with torch.device("meta"):
        state = lpi.Backbone(lpi.load_preset(name)).state_dict()
    inferred = infer_config(state)
    assert inferred == lpi.load_preset(name)
    for tower in (inferred.vision, inferred.text):
        assert tower.heads == tower.width // 64


def test_inference_alone_gives_width_over_64_heads(state):
    inferred = infer_config(state)
    assert (inferred.vision.heads, inferred.text.heads) == (1, 1)  # width 64


def test_config_override_sets_what_weights_cannot_say(tmp_path):
    """A 2-head model needs config=; inferred alone (1 head) it computes something else."""
    reference = _open_clip_model(heads=2)
    path = _torch_save(reference.state_dict(), tmp_path / "two_heads.pt")
    ours = lpi.load_backbone(path, config=_config(heads=2))
    assert ours.config.vision.heads == 2 and ours.config.text.heads == 2
    assert _max_diff(ours, reference, seed=8) <= TOLERANCE
    assert _max_diff(lpi.load_backbone(path), reference, seed=8) > WRONG_MODEL_GAP


def test_activation_override(tmp_path):
    """GELU weights need activation="gelu"; QuickGELU (the default) is measurably off."""
    reference = _open_clip_model(quick_gelu=False)
    path = _torch_save(reference.state_dict(), tmp_path / "gelu.pt")
    ours = lpi.load_backbone(path, activation="gelu")
    assert ours.config.activation == "gelu"
    assert _max_diff(ours, reference, seed=9) <= TOLERANCE
    assert _max_diff(lpi.load_backbone(path), reference, seed=9) > WRONG_MODEL_GAP


def test_activation_applies_on_top_of_config(state, tmp_path):
    path = _torch_save(state, tmp_path / "model.pt")
    ours = lpi.load_backbone(path, activation="gelu", config=_config(heads=1, activation="gelu"))
    assert ours.config.activation == "gelu"
    ours = lpi.load_backbone(path, activation="gelu", config=_config(heads=1))
    assert ours.config.activation == "gelu"


@pytest.mark.parametrize("source", ["file", "tiny"])
def test_unknown_activation_is_refused(state, tmp_path, source):
    path = _torch_save(state, tmp_path / "model.pt") if source == "file" else source
    _refused(path, "activation must be 'quick_gelu' or 'gelu', got 'relu'", activation="relu")


def test_config_with_a_preset_is_refused():
    with pytest.raises(CheckpointError, match="'tiny' is a preset"):
        lpi.load_backbone("tiny", config=_config(heads=1))


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


# ---- bad input: each refusal is a CheckpointError whose message names the problem ----


def test_unknown_suffix(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"onnx")
    _refused(path, r"unknown checkpoint format '\.onnx'")


def test_nonexistent_path_that_is_not_a_preset(tmp_path):
    _refused(tmp_path / "missing.pt", r"missing\.pt does not exist \(and is not a preset: .*tiny")
    _refused("ViT-Z-99", "ViT-Z-99 does not exist")


def test_missing_keys(state, tmp_path):
    broken = {k: v for k, v in state.items() if k != "visual.ln_post.weight"}
    _refused(_torch_save(broken, tmp_path / "m.pt"), r"missing visual\.ln_post\.weight")


def test_missing_key_that_inference_needs(state, tmp_path):
    broken = {k: v for k, v in state.items() if k != "ln_final.weight"}
    _refused(_torch_save(broken, tmp_path / "m.pt"), r"missing weight 'ln_final\.weight'")


def test_unexpected_keys(state, tmp_path):
    broken = {**state, "visual.extra_head.weight": torch.ones(3)}
    _refused(_torch_save(broken, tmp_path / "m.pt"), r"unexpected visual\.extra_head\.weight")


def test_misshaped_keys(state, tmp_path):
    broken = {**state, "visual.ln_post.bias": torch.ones(65)}
    _refused(
        _torch_save(broken, tmp_path / "m.pt"),
        r"mis-shaped weights: visual\.ln_post\.bias: \(65,\) != \(64,\)",
    )


def test_truncated_pt(state, tmp_path):
    path = _torch_save(state, tmp_path / "m.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _refused(path, "not a readable state dict .*truncated or corrupted")


def test_corrupted_pt(tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(bytes(range(256)) * 8)
    _refused(path, "m.pt: not a readable state dict")


def test_truncated_torchscript(reference, tmp_path):
    path = tmp_path / "ts.pt"
    _write_torchscript(reference, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _refused(path, "truncated or corrupted")


def test_torchscript_without_valid_code(tmp_path):
    """A zip that looks like TorchScript (a code/ folder) but is not: a clear error."""
    path = tmp_path / "fake.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("fake/code/__torch__.py", "not torchscript")
        archive.writestr("fake/data.pkl", b"\x80\x02}q\x00.")
    _refused(path, "fake.pt: not a readable TorchScript archive")


def test_truncated_safetensors(state, tmp_path):
    path = _safetensors(state, tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _refused(path, "not a readable safetensors file .*incomplete metadata")


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ("{not json", "metadata 'lpi.config' is not JSON"),
        ('{"embed_dim": 64}', "stored architecture is invalid"),
    ],
)
def test_safetensors_with_bad_stored_config(state, tmp_path, metadata, match):
    path = tmp_path / "m.safetensors"
    tensors = {k: v.contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"lpi.config": metadata})
    _refused(path, match)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ([torch.ones(2)], "expected a dict of tensors, got list"),
        ({"visual.conv1.weight": torch.ones(2), "epoch": 3}, "'epoch' is int"),
    ],
)
def test_pickle_that_is_not_a_dict_of_tensors(tmp_path, obj, match):
    _refused(_torch_save(obj, tmp_path / "m.pt"), match)


class _Payload:
    """Unpickling this creates a file: if the file is absent, no code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "code-ran"
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload works when unpickled freely
    assert marker.exists()
    marker.unlink()
    path = _torch_save({"visual.conv1.weight": _Payload(marker)}, tmp_path / "evil.pt")
    _refused(path, "pickles the Python object .*which weights_only=True refuses")
    assert not marker.exists()


def test_resnet_state_dict(tmp_path):
    resnet = {
        "visual.conv1.weight": torch.ones(32, 3, 3, 3),
        "visual.layer1.0.conv1.weight": torch.ones(64, 64, 1, 1),
        "visual.attnpool.c_proj.weight": torch.ones(1024, 2048),
        "token_embedding.weight": torch.ones(49408, 512),
    }
    _refused(_torch_save(resnet, tmp_path / "RN50.pt"), r"ResNet image towers \(RN50, \.\.\.\)")


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("ln_final.weight", torch.ones(200), "text.width 200 is not divisible by heads 3"),
        ("text_projection", torch.ones(64), "tuple index out of range"),
    ],
    ids=["width_not_divisible_by_width_over_64", "one_dimensional_projection"],
)
def test_uninferable_shapes(state, tmp_path, key, value, match):
    """Shapes inference cannot read: the error says so and points to config=."""
    path = _torch_save({**state, key: value}, tmp_path / "m.pt")
    _refused(path, f"cannot infer the architecture .*{match}.*pass config=")


def test_not_a_clip_state_dict(tmp_path):
    _refused(_torch_save({"fc.weight": torch.ones(2, 2)}, tmp_path / "m.pt"), "not a CLIP")


def test_folder_without_config_json(tmp_path):
    _refused(tmp_path, "is a folder without config.json")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    _refused(tmp_path, "neither model.safetensors nor pytorch_model.bin")
