"""The losses of METHOD.md §4 against direct, loop-by-loop formulations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lpi.continual import losses


def _rand(generator, *shape):
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def test_clip_loss_is_symmetric_infonce(generator):
    image = F.normalize(_rand(generator, 6, 8), dim=-1)
    text = F.normalize(_rand(generator, 6, 8), dim=-1)
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    logits = (1 / 0.07) * image @ text.T
    by_row = [-torch.log_softmax(logits[i], 0)[i] for i in range(6)]
    by_col = [-torch.log_softmax(logits[:, i], 0)[i] for i in range(6)]
    expected = 0.5 * (sum(by_row) / 6 + sum(by_col) / 6)
    torch.testing.assert_close(losses.clip_loss(image, text, scale), expected)


def test_layer_contrast_loss(generator):
    prompts_v, prompts_t = _rand(generator, 4, 5, 12), _rand(generator, 4, 5, 10)
    z_v = [prompts_v[j].mean(-1) / prompts_v[j].mean(-1).norm() for j in range(4)]
    z_t = [prompts_t[j].mean(-1) / prompts_t[j].mean(-1).norm() for j in range(4)]
    g = torch.tensor(
        [[100 * float(z_v[i] @ z_t[j]) for j in range(4)] for i in range(4)], dtype=torch.float64
    )
    target = torch.arange(4)
    expected = 0.5 * (F.cross_entropy(g, target) + F.cross_entropy(g.T, target))
    torch.testing.assert_close(losses.layer_contrast_loss(prompts_v, prompts_t), expected)


def test_layer_contrast_prefers_aligned_layers(generator):
    prompts = _rand(generator, 3, 5, 12)
    aligned = losses.layer_contrast_loss(prompts, prompts)
    shuffled = losses.layer_contrast_loss(prompts, prompts[[1, 2, 0]])
    assert aligned < shuffled


def test_task_targets_fixed_threshold_and_diagonal():
    similarity = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.5], [0.1, 0.5, 1.0]])
    targets = losses.task_targets(similarity)  # default 0.5, strict: 0.5 itself is negative
    expected = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    assert torch.equal(targets, expected)
    assert torch.equal(losses.task_targets(similarity, threshold=0.05), torch.ones(3, 3).bool())
    # Fixed, not a statistic of S: all-similar tasks stay all positive (a median would split
    # them), and the diagonal is positive even under a threshold above 1.
    close = torch.full((3, 3), 0.9).fill_diagonal_(1.0)
    assert torch.equal(losses.task_targets(close), torch.ones(3, 3).bool())
    assert torch.equal(losses.task_targets(close, threshold=2.0), torch.eye(3).bool())


def test_layer_contrast_is_finite_for_zero_mean_prompts():
    """A layer whose per-token mean over D is exactly 0 (what a LayerNorm outputs) must give a
    finite loss and gradient: the eps (1e-6) normalisation keeps 0/0 out."""
    prompts_v = torch.randn(3, 4, 8, dtype=torch.float64)
    prompts_v = (prompts_v - prompts_v.mean(-1, keepdim=True)).requires_grad_(True)
    prompts_t = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    loss = losses.layer_contrast_loss(prompts_v, prompts_t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(prompts_v.grad).all()


def test_task_constraint_is_class_balanced_bce(generator):
    flat_v, flat_t = _rand(generator, 3, 20), _rand(generator, 3, 16)
    targets = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)

    def per_modality(flat):
        rows = []
        for i in range(3):
            cos = [float(F.cosine_similarity(flat[i], flat[j], dim=0)) for j in range(3)]
            p = [1 / (1 + math.exp(-c / 0.05)) for c in cos]
            pos = [-math.log(p[j]) for j in range(3) if targets[i, j]]
            neg = [-math.log(1 - p[j]) for j in range(3) if not targets[i, j]]
            rows.append(0.5 * (sum(pos) / len(pos) + sum(neg) / len(neg)))
        return sum(rows) / 3

    expected = 0.5 * (per_modality(flat_v) + per_modality(flat_t))
    got = losses.task_constraint_loss(flat_v, flat_t, targets)
    assert abs(float(got) - expected) < 1e-9  # float64 throughout: rounding only


def test_task_constraint_gradient_reaches_only_the_current_task(generator):
    earlier = _rand(generator, 2, 20)
    current = _rand(generator, 1, 20).requires_grad_(True)
    flat = torch.cat([earlier, current])
    targets = torch.eye(3, dtype=torch.bool)
    losses.task_constraint_loss(flat, flat, targets).backward()
    assert current.grad is not None and current.grad.abs().sum() > 0


def test_lpi_loss_weights():
    image = F.normalize(torch.randn(4, 8), dim=-1)
    text = F.normalize(torch.randn(4, 8), dim=-1)
    prompts_v, prompts_t = torch.randn(3, 5, 8), torch.randn(3, 5, 6)
    task = torch.tensor(0.7)
    parts = losses.lpi_loss(image, text, torch.tensor(2.0), prompts_v, prompts_t, task)
    expected = parts["clip"] + 0.1 * parts["layer"] + 0.1 * task
    torch.testing.assert_close(parts["total"], expected)
    first = losses.lpi_loss(image, text, torch.tensor(2.0), prompts_v, prompts_t, None)
    assert "task" not in first
    torch.testing.assert_close(first["total"], first["clip"] + 0.1 * first["layer"])
