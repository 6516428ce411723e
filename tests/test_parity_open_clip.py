"""The backbone against open_clip on the same random weights (nothing downloaded).

Tolerance: max abs diff <= 1e-5 on unit-norm fp32 features. Both implementations compute the
same operations in a different order (fused MHA vs SDPA, batched vs separate q/k/v), so they
agree to fp32 rounding accumulated over 12 layers, about 1e-6; 1e-5 leaves room for that and
no room for a wrong operation (a missing LayerNorm or a wrong activation moves features by 1e-2).
"""

from __future__ import annotations

import pytest
import torch

import lpi
from tests.conftest import CAPTIONS

open_clip = pytest.importorskip("open_clip", reason="open_clip imports only beside torchvision")

TOLERANCE = 1e-5

SHAPES = {
    # name: (vision cfg, text cfg, embed_dim, lpi heads override)
    "tiny": (
        dict(layers=3, width=64, head_width=32, patch_size=8, image_size=32),
        dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=3),
        64,
    ),
    "ViT-B-32": (
        dict(layers=12, width=768, head_width=64, patch_size=32, image_size=224),
        dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12),
        512,
    ),
    "ViT-B-16": (
        dict(layers=12, width=768, head_width=64, patch_size=16, image_size=224),
        dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12),
        512,
    ),
}


def _open_clip_model(name: str, quick_gelu: bool) -> torch.nn.Module:
    vision, text, embed_dim = SHAPES[name]
    torch.manual_seed(7)
    model = open_clip.model.CLIP(
        embed_dim=embed_dim,
        vision_cfg=open_clip.model.CLIPVisionCfg(**vision),
        text_cfg=open_clip.model.CLIPTextCfg(**text),
        quick_gelu=quick_gelu,
    )
    with torch.no_grad():  # open_clip zero-initialises biases: make every weight random
        for name_, param in model.named_parameters():
            if name_.endswith("bias"):
                param.normal_(0, 0.02)
    return model.eval()


def _config(name: str, activation: str) -> lpi.ClipConfig:
    vision, text, embed_dim = SHAPES[name]
    return lpi.ClipConfig(
        embed_dim=embed_dim,
        vision=lpi.VisionConfig(
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
            width=vision["width"],
            layers=vision["layers"],
            heads=vision["width"] // vision["head_width"],
        ),
        text=lpi.TextConfig(
            context_length=77,
            vocab_size=49408,
            width=text["width"],
            layers=text["layers"],
            heads=text["heads"],
        ),
        activation=activation,
    )


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_features_equal_open_clip(name, activation, tmp_path, generator):
    if name != "tiny" and activation == "gelu":
        pytest.skip("GELU is covered by the tiny shape; ViT-B runs once to bound CI time")
    reference = _open_clip_model(name, quick_gelu=activation == "quick_gelu")
    path = tmp_path / "open_clip.pt"
    torch.save(reference.state_dict(), path)
    # The head count of the tiny shape (width 64, 2 heads) is not OpenAI's width // 64.
    config = _config(name, activation) if name == "tiny" else None
    ours = lpi.load_backbone(path, activation=activation, config=config)
    assert ours.config == _config(name, activation)  # inferred from the weights for ViT-B

    size = ours.config.vision.image_size
    pixels = torch.randn(3, 3, size, size, generator=generator)
    tokens = lpi.tokenize(CAPTIONS)
    with torch.no_grad():
        ref_image = torch.nn.functional.normalize(reference.encode_image(pixels), dim=-1)
        ref_text = torch.nn.functional.normalize(reference.encode_text(tokens), dim=-1)
        image = ours.encode_image(pixels)
        text = ours.encode_text(tokens)
    image_diff = (image - ref_image).abs().max().item()
    text_diff = (text - ref_text).abs().max().item()
    print(f"{name} {activation}: image max|diff| {image_diff:.2e}, text {text_diff:.2e}")
    assert image_diff <= TOLERANCE
    assert text_diff <= TOLERANCE
