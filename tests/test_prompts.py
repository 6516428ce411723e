"""Task prompt factors, the interaction module, and parameter counts (METHOD.md §2)."""

from __future__ import annotations

import pytest
import torch

import lpi
from lpi.prompts import cp_prompts


def test_parameter_count_vit_b16_without_interaction_is_5284():
    config = lpi.PromptConfig(layers=9, tokens=16, rank=4, interaction=False)
    prompts = lpi.TaskPrompts(config, vision_width=768, text_width=512)
    assert prompts.num_parameters() == 4 * (9 + 2 * 16 + 768 + 512) == 5284


def test_parameter_count_vit_b16_with_interaction():
    config = lpi.PromptConfig(layers=9, tokens=16, rank=4, interaction_rank=4)
    count = lpi.TaskPrompts(config, vision_width=768, text_width=512).num_parameters()
    print(f"ViT-B/16, J=9 N=16 R=4 R_i=4 with interaction: {count:,} parameters per task")
    # E: 2 x 8x4, F: (513 + 769) x 4, G: (768 + 512) x 4, two LayerNorms: 2 x (768 + 512).
    interaction = 2 * 8 * 4 + (513 + 769) * 4 + (768 + 512) * 4 + 2 * (768 + 512)
    assert count == 5284 + interaction == 18156


def test_cp_prompts_matches_the_per_layer_formula(generator):
    """P[j] = (1/R) B diag(A[j]) C^T, written as docs/METHOD.md writes it."""
    a, b, c = (torch.randn(*s, generator=generator) for s in ((3, 4), (5, 4), (6, 4)))
    expected = torch.stack([b @ torch.diag(a[j]) @ c.T / 4 for j in range(3)])
    torch.testing.assert_close(cp_prompts(a, b, c), expected)


def test_initial_prompt_scale_is_about_0_0625():
    """Factors ~ N(0, 0.5^2) give entries of std 0.5^3 * sqrt(R) / R = 0.0625 at R = 4."""
    torch.manual_seed(0)
    prompts = lpi.TaskPrompts(lpi.PromptConfig(interaction=False), 768, 512)
    std = prompts.raw_prompts()[0].std().item()
    assert 0.05 < std < 0.075


def test_interaction_follows_the_spec_and_leaves_layer_zero(generator):
    torch.manual_seed(1)
    config = lpi.PromptConfig(layers=3, tokens=4, rank=2, interaction_rank=3, alpha=0.1)
    prompts = lpi.TaskPrompts(config, vision_width=8, text_width=6)
    mixed_v, mixed_t = prompts()
    raw_v, raw_t = prompts.raw_prompts()
    assert torch.equal(mixed_v[0], raw_v[0]) and torch.equal(mixed_t[0], raw_t[0])
    module = prompts.interaction.text_to_image
    for j in (1, 2):  # W_tv[j] materialised exactly as docs/METHOD.md writes it
        weight = (
            sum(module.E[j - 1, r] * torch.outer(module.F[:, r], module.G[:, r]) for r in range(3))
            / 3
        )
        mixed = 0.9 * raw_v[j] + 0.1 * torch.cat([raw_t[j], torch.ones(4, 1)], 1) @ weight
        expected = prompts.interaction.ln_v(mixed)
        torch.testing.assert_close(mixed_v[j], expected, atol=1e-6, rtol=1e-5)


def test_interaction_off_is_the_raw_prompt():
    prompts = lpi.TaskPrompts(lpi.PromptConfig(layers=2, tokens=3, interaction=False), 8, 6)
    assert all(torch.equal(x, y) for x, y in zip(prompts(), prompts.raw_prompts(), strict=True))


def test_bad_prompt_configs_are_refused(tiny_backbone):
    with pytest.raises(ValueError, match="rank"):
        lpi.PromptConfig(rank=0)
    with pytest.raises(ValueError, match="alpha"):
        lpi.PromptConfig(alpha=1.5)
    with pytest.raises(ValueError, match="exceeds the backbone's depth"):
        lpi.TaskPrompts.for_backbone(lpi.PromptConfig(layers=9), tiny_backbone)


def test_dense_prompts_shapes_scale_and_count():
    torch.manual_seed(2)
    dense = lpi.DensePrompts(lpi.PromptConfig(layers=9, tokens=16, rank=4), 768, 512)
    assert dense.num_parameters() == 9 * 16 * (768 + 512) == 184_320
    assert 0.055 < dense.P_v.std().item() < 0.07  # the scale LPI's factors start at
    with pytest.raises(ValueError, match="same J and N"):
        lpi.DensePrompts.from_tensors(torch.randn(2, 3, 8), torch.randn(2, 4, 6))
