"""The LPI training losses (METHOD.md §4), as plain functions of tensors.

    L = L_clip + 0.1 * L_layer + 0.1 * [k >= 1] * L_task

Dimensions: B batch, E embedding, J layers, N prompt tokens, D width, K tasks seen so far.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LAYER_WEIGHT = 0.1
TASK_WEIGHT = 0.1
LAYER_SCALE = 100.0
LAYER_EPS = 1e-6  # of the L2 normalisation of z_m[j]
TASK_TAU = 0.05
TASK_THRESHOLD = 0.5  # Y = S > threshold, fixed and recorded by the run


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE over the batch; features [B, E] unit-norm, scale the frozen log-scale."""
    logits = logit_scale.exp() * image_features @ text_features.T  # [B, B]
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def layer_contrast_loss(prompts_v: Tensor, prompts_t: Tensor) -> Tensor:
    """Hierarchical low-rank contrast: image layer j must match text layer j and no other.

    z_m[j] = mean over D of the RAW P_m[j] (a vector of N), L2-normalised with eps 1e-6;
    G = 100 Z_v Z_t^T. Raw, not P': the interaction's LayerNorm makes P''s per-token mean
    exactly 0 at init, and normalising that amplifies rounding noise into huge gradients.
    """
    z_v = F.normalize(prompts_v.mean(dim=-1), dim=-1, eps=LAYER_EPS)  # [J, N]
    z_t = F.normalize(prompts_t.mean(dim=-1), dim=-1, eps=LAYER_EPS)
    logits = LAYER_SCALE * z_v @ z_t.T  # [J, J]
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def task_similarity(description_features: Tensor) -> Tensor:
    """S [K, K]: cosines between frozen text features of the tasks' descriptions [K, E]."""
    unit = F.normalize(description_features, dim=-1)
    return unit @ unit.T


def task_targets(similarity: Tensor, threshold: float = TASK_THRESHOLD) -> Tensor:
    """Y = S > threshold (a fixed threshold, never a statistic of S), diagonal positive."""
    eye = torch.eye(similarity.shape[0], dtype=torch.bool, device=similarity.device)
    return (similarity > threshold) | eye


def _balanced_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Per row: half the mean BCE over positives plus half over negatives (if any)."""
    positives = targets.to(logits.dtype)
    negatives = 1 - positives
    losses = F.binary_cross_entropy_with_logits(logits, positives, reduction="none")  # [K, K]
    pos_mean = (losses * positives).sum(1) / positives.sum(1).clamp_min(1)
    neg_mean = (losses * negatives).sum(1) / negatives.sum(1).clamp_min(1)
    row = torch.where(negatives.sum(1) > 0, 0.5 * (pos_mean + neg_mean), pos_mean)
    return row.mean()


def task_constraint_loss(
    task_prompts_v: Tensor,  # [K, J*N*D_v] flattened raw P_v of tasks 0..k
    task_prompts_t: Tensor,  # [K, J*N*D_t]
    targets: Tensor,  # [K, K] bool
    tau: float = TASK_TAU,
) -> Tensor:
    """Class-balanced BCE of sigmoid(cos(prompts_i, prompts_j) / tau) against Y, per modality.

    The caller passes earlier tasks' prompts detached, so only the current task learns.
    """
    total = task_prompts_v.new_zeros(())
    for flat in (task_prompts_v, task_prompts_t):
        unit = F.normalize(flat, dim=-1)
        total = total + _balanced_bce(unit @ unit.T / tau, targets)  # BCE of sigmoid(C / tau)
    return total / 2


def lpi_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    prompts_v: Tensor,
    prompts_t: Tensor,
    task_loss: Tensor | None = None,
    use_layer_loss: bool = True,
) -> dict[str, Tensor]:
    """The total and its parts; `prompts_*` are the RAW P_m (before the interaction),
    `task_loss` is None for the first task (k = 0) or when the run has no task similarity."""
    parts = {"clip": clip_loss(image_features, text_features, logit_scale)}
    if use_layer_loss:
        parts["layer"] = layer_contrast_loss(prompts_v, prompts_t)
    if task_loss is not None:
        parts["task"] = task_loss
    total = parts["clip"] + LAYER_WEIGHT * parts.get("layer", 0.0)
    parts["total"] = total + TASK_WEIGHT * parts.get("task", 0.0)
    return parts
