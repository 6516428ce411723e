"""The fold of METHOD.md §6 against the materialised prefix of the reference path.

The reference is `lpi.task_prefix` run on a float64 copy of the backbone (its own LayerNorm and
projection modules), independent of the fold's algebra. Tolerance: relative error <= 1e-5, as
the method requires of every export; in float64 the closed form is exact to ~1e-15.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lpi
from lpi.fold import factor_by_svd, fold_layer_closed_form, relative_error
from tests.conftest import random_prompts

TOLERANCE = 1e-5


def _reference_prefix(backbone, prompts):
    backbone64 = copy.deepcopy(backbone).double()
    with torch.no_grad():
        return lpi.task_prefix(backbone64, *copy.deepcopy(prompts).double()())


def _assert_fold_matches(backbone, prompts):
    folded = lpi.fold_task(backbone, prompts)
    reference = _reference_prefix(backbone, prompts)
    pairs = {
        "image keys": (folded.image.materialise()[0], reference.image_keys),
        "image values": (folded.image.materialise()[1], reference.image_values),
        "text keys": (folded.text.materialise()[0], reference.text_keys),
        "text values": (folded.text.materialise()[1], reference.text_values),
    }
    for name, (approx, exact) in pairs.items():
        assert approx.dtype == torch.float64
        assert relative_error(approx, exact) <= TOLERANCE, name
    return folded


def test_closed_form_fold_is_exact_and_rank_r_plus_one(tiny_backbone):
    prompts = random_prompts(tiny_backbone, seed=5, interaction=False)
    folded = _assert_fold_matches(tiny_backbone, prompts)
    assert folded.image.rank == folded.text.rank == prompts.config.rank + 1
    error = relative_error(
        folded.image.materialise()[0], _reference_prefix(tiny_backbone, prompts).image_keys
    )
    assert error < 1e-12  # the closed form is exact: only float64 rounding remains


def test_svd_fold_with_interaction(tiny_backbone):
    prompts = random_prompts(tiny_backbone, seed=6, interaction=True, tokens=16)
    folded = _assert_fold_matches(tiny_backbone, prompts)
    # With the interaction the rank grows to at most 2R + 4 (or dense when above N / 2).
    assert folded.image.rank <= max(2 * prompts.config.rank + 4, prompts.config.tokens)


@pytest.mark.slow
def test_closed_form_fold_at_vit_b16_shapes():
    backbone = lpi.load_backbone("ViT-B-16")
    torch.manual_seed(0)
    prompts = lpi.TaskPrompts.for_backbone(lpi.PromptConfig(interaction=False), backbone)
    folded = _assert_fold_matches(backbone, prompts)
    assert folded.image.key_u.shape == (9, 16, 5) and folded.image.key_m.shape == (9, 5, 768)
    assert folded.text.value_m.shape == (9, 5, 512)


def test_fold_layer_against_direct_formula(generator):
    """One layer in float64 with random LayerNorm parameters: U @ M = LN(P) W^T + b."""
    n, d, d_out, r = 7, 24, 20, 3
    g = generator
    a, b, c = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((r,), (n, r), (d, r)))
    gamma, beta = (torch.randn(d, generator=g, dtype=torch.float64) for _ in range(2))
    w, bias = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((d_out, d), (d_out,)))
    prompt = (b * a) @ c.T / r  # [N, D]
    exact = torch.nn.functional.layer_norm(prompt, (d,), gamma, beta, 1e-5) @ w.T + bias
    u, m = fold_layer_closed_form(a, b, c, gamma, beta, 1e-5, w, bias)
    assert u.shape == (n, r + 1) and m.shape == (r + 1, d_out)
    assert relative_error(u @ m, exact) < 1e-12


def test_svd_goes_dense_above_half_the_tokens(generator):
    full_rank = torch.randn(8, 32, generator=generator, dtype=torch.float64)
    u, m = factor_by_svd(full_rank)
    assert torch.equal(u, torch.eye(8, dtype=torch.float64)) and torch.equal(m, full_rank)
    low_rank = full_rank[:, :2] @ torch.randn(2, 32, generator=generator, dtype=torch.float64)
    u, m = factor_by_svd(low_rank)
    assert u.shape == (8, 2) and relative_error(u @ m, low_rank) < 1e-12


def test_dense_prompts_fold_by_svd(tiny_backbone):
    """Dense prompts (the S-Prompts baseline, or prompts imported from elsewhere) fold too."""
    torch.manual_seed(8)
    dense = lpi.DensePrompts.from_tensors(torch.randn(3, 4, 64), torch.randn(3, 4, 64))
    folded = _assert_fold_matches(tiny_backbone, dense)
    assert folded.image.rank == 4  # full-rank random prompts: stored dense (U = I)
