"""The prefix path against a naive implementation that puts the prompt tokens in the sequence.

The naive model, written here from METHOD.md §3 and independent of lpi's attention code:
at each prompted layer j < J the N prompt tokens P'[j] are placed before the real tokens, the
block runs on the longer sequence (its own LN1 and projections, an explicit softmax), real
tokens see every prompt token and, for text, earlier real tokens only; the prompt rows'
outputs are dropped. Tolerance 1e-5 on unit-norm fp32 features: the two orders of summation
differ only by rounding (observed about 1e-7).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lpi
from tests.conftest import CAPTIONS, random_pixels, random_prompts

TOLERANCE = 1e-5


def _naive_attention(block, x: torch.Tensor, prompt: torch.Tensor | None, causal: bool):
    """One block's attention output for real tokens, prompt tokens inserted first."""
    batch, length, width = x.shape
    extra = 0 if prompt is None else prompt.shape[0]
    seq = x if prompt is None else torch.cat([prompt.expand(batch, -1, -1), x], dim=1)
    normed = block.ln_1(seq)
    qkv = normed @ block.attn.in_proj_weight.T + block.attn.in_proj_bias
    heads = block.attn.heads
    q, k, v = (
        t.reshape(batch, extra + length, heads, width // heads).permute(0, 2, 1, 3)
        for t in qkv.chunk(3, dim=-1)
    )
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    allowed = torch.ones(extra + length, extra + length, dtype=torch.bool)
    if causal:
        allowed[extra:, extra:] = torch.ones(length, length).tril().bool()
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(batch, extra + length, width)
    return block.attn.out_proj(out[:, extra:])  # prompt rows are dropped


def _naive_transformer(blocks, x, prompts, causal):
    for j, block in enumerate(blocks):
        prompt = prompts[j] if prompts is not None and j < prompts.shape[0] else None
        x = x + _naive_attention(block, x, prompt, causal)
        x = x + block.mlp(block.ln_2(x))
    return x


def naive_image(backbone, pixels, prompts):
    visual = backbone.visual
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    x = _naive_transformer(visual.transformer.resblocks, x, prompts, causal=False)
    return F.normalize(visual.ln_post(x[:, 0]) @ visual.proj, dim=-1)


def naive_text(backbone, tokens, prompts):
    """Full 77-token context (no trimming), argmax EOT pooling."""
    x = backbone.token_embedding(tokens) + backbone.positional_embedding
    x = _naive_transformer(backbone.transformer.resblocks, x, prompts, causal=True)
    x = backbone.ln_final(x[torch.arange(x.shape[0]), tokens.argmax(-1)])
    return F.normalize(x @ backbone.text_projection, dim=-1)


@pytest.mark.parametrize("interaction", [False, True])
def test_single_task_matches_naive(tiny_backbone, generator, interaction):
    prompts = random_prompts(tiny_backbone, seed=1, interaction=interaction)
    bank = lpi.PromptBank()
    bank.add("shapes", prompts)
    pixels = random_pixels(tiny_backbone, 3, generator)
    tokens = lpi.tokenize(CAPTIONS)
    with torch.no_grad():
        image_prefix, _ = bank.prefixes(tiny_backbone, ["shapes"] * 3)
        _, text_prefix = bank.prefixes(tiny_backbone, ["shapes"] * len(CAPTIONS))
        prompts_v, prompts_t = prompts()
        image = tiny_backbone.encode_image(pixels, image_prefix)
        text = tiny_backbone.encode_text(tokens, text_prefix)
        assert (image - naive_image(tiny_backbone, pixels, prompts_v)).abs().max() <= TOLERANCE
        assert (text - naive_text(tiny_backbone, tokens, prompts_t)).abs().max() <= TOLERANCE
        # The prompts must change the features, or the comparison above proves nothing.
        assert (image - tiny_backbone.encode_image(pixels)).abs().max() > 1e-3


def test_mixed_batch_matches_each_row_alone(tiny_backbone, generator):
    """Rows of three tasks and rows of none in one batch: each equals its naive single run."""
    bank = lpi.PromptBank()
    for seed, name in enumerate(["a", "b", "c"]):
        bank.add(name, random_prompts(tiny_backbone, seed=10 + seed, interaction=seed != 1))
    rows = ["b", None, "a", "c", None, "a"]
    pixels = random_pixels(tiny_backbone, len(rows), generator)
    tokens = lpi.tokenize((CAPTIONS * 2)[: len(rows)])
    with torch.no_grad():
        image_prefix, text_prefix = bank.prefixes(tiny_backbone, rows)
        image = tiny_backbone.encode_image(pixels, image_prefix)
        text = tiny_backbone.encode_text(tokens, text_prefix)
        for row, task in enumerate(rows):
            prompts_v, prompts_t = bank.tasks[task]() if task else (None, None)
            ref_image = naive_image(tiny_backbone, pixels[row : row + 1], prompts_v)
            ref_text = naive_text(tiny_backbone, tokens[row : row + 1], prompts_t)
            assert (image[row] - ref_image[0]).abs().max() <= TOLERANCE, (row, task)
            assert (text[row] - ref_text[0]).abs().max() <= TOLERANCE, (row, task)


def test_no_task_is_exactly_the_frozen_backbone(tiny_backbone, generator):
    """prefix=None runs the unmodified towers: bit-identical to the naive frozen model."""
    pixels = random_pixels(tiny_backbone, 4, generator)
    tokens = lpi.tokenize(CAPTIONS)
    with torch.no_grad():
        image = tiny_backbone.encode_image(pixels)
        text = tiny_backbone.encode_text(tokens)
        assert (image - naive_image(tiny_backbone, pixels, None)).abs().max() <= TOLERANCE
        assert (text - naive_text(tiny_backbone, tokens, None)).abs().max() <= TOLERANCE
        # Deterministic: the same call twice gives the same bits.
        assert torch.equal(image, tiny_backbone.encode_image(pixels))


def test_text_trimmed_to_longest_equals_full_context(tiny_backbone):
    """Cutting the padding after the batch's last EOT gives the same features (causal)."""
    tokens = lpi.tokenize(CAPTIONS)
    with torch.no_grad():
        trimmed = tiny_backbone.encode_text(tokens)
        full = naive_text(tiny_backbone, tokens, None)
    assert (trimmed - full).abs().max() <= TOLERANCE


def test_prefix_gradients_reach_only_the_task_factors(tiny_backbone, generator):
    prompts = random_prompts(tiny_backbone, seed=3)
    bank = lpi.PromptBank()
    bank.add("t", prompts)
    image_prefix, text_prefix = bank.prefixes(tiny_backbone, ["t", "t"])
    image = tiny_backbone.encode_image(random_pixels(tiny_backbone, 2, generator), image_prefix)
    text = tiny_backbone.encode_text(lpi.tokenize(CAPTIONS[:2]), text_prefix)
    (image * text).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompts.parameters())
    assert all(p.grad is None for p in tiny_backbone.parameters())


def test_bad_prefix_is_refused(tiny_backbone, generator):
    bank = lpi.PromptBank()
    bank.add("t", random_prompts(tiny_backbone, seed=4))
    image_prefix, _ = bank.prefixes(tiny_backbone, ["t", "t"])
    pixels = random_pixels(tiny_backbone, 3, generator)
    with pytest.raises(ValueError, match="batch 2"):
        tiny_backbone.encode_image(pixels, image_prefix)
    with pytest.raises(ValueError, match="width"):
        tiny_backbone.encode_image(
            pixels[:2], lpi.Prefix(image_prefix.keys[..., :8], image_prefix.values[..., :8])
        )
    with pytest.raises(KeyError, match="unknown tasks"):
        bank.prefixes(tiny_backbone, ["t", "nope"])
