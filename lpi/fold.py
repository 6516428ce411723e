"""Folding a task into per-layer prefix factors K_p = U @ M (METHOD.md §6).

Serving never rebuilds prompts on the hot path: for each encoder and prompted layer the prefix
keys (and values) are stored as U [N, R'] and M [R', D]. Without the interaction the fold is
exact and closed-form, with w_n = diag(A[j]) B[n] / R, C~ = C minus its column means and
sigma_n = sqrt(|C~ w_n|^2 / D + eps):

    U = [w_n / sigma_n | 1]                                   # N x (R+1)
    M = [C~.T diag(gamma) W.T ; beta W.T + b]                 # (R+1) x D   (torch Linear W)

With the interaction the materialised prefix is factored by SVD in float64 (singular values
above 1e-7 of the largest), stored dense (U = I) when R' would exceed N/2. Every fold is
checked: |U @ M - K_p| / |K_p| < 1e-5. Dimensions: J layers, N tokens, R rank, D width.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from lpi.prompts import DensePrompts, TaskPrompts

if TYPE_CHECKING:
    from lpi.backbone import Backbone, ResidualBlock

FOLD_TOLERANCE = 1e-5
SVD_RELATIVE_CUTOFF = 1e-7


class FoldError(RuntimeError):
    """A fold whose factors do not reproduce the materialised prefix."""


@dataclass(frozen=True)
class FoldedTower:
    """One encoder's prefix factors, zero-padded to a common rank R' across layers."""

    key_u: Tensor  # [J, N, R']
    key_m: Tensor  # [J, R', D]
    value_u: Tensor  # [J, N, R']
    value_m: Tensor  # [J, R', D]

    def materialise(self) -> tuple[Tensor, Tensor]:
        """Prefix keys and values [J, N, D]."""
        return self.key_u @ self.key_m, self.value_u @ self.value_m

    @property
    def rank(self) -> int:
        return self.key_u.shape[-1]

    def to(self, dtype: torch.dtype) -> FoldedTower:
        return FoldedTower(
            *(t.to(dtype) for t in (self.key_u, self.key_m, self.value_u, self.value_m))
        )


@dataclass(frozen=True)
class FoldedTask:
    image: FoldedTower
    text: FoldedTower


def fold_layer_closed_form(
    layer_factor: Tensor,  # [R]   A[j]
    token_factor: Tensor,  # [N, R] B_m
    embed_factor: Tensor,  # [D, R] C_m
    ln_weight: Tensor,  # [D] gamma
    ln_bias: Tensor,  # [D] beta
    ln_eps: float,
    proj_weight: Tensor,  # [D_out, D] (torch Linear layout)
    proj_bias: Tensor,  # [D_out]
) -> tuple[Tensor, Tensor]:
    """U [N, R+1], M [R+1, D_out] with U @ M = LN(P[j]) W.T + b, exactly."""
    rank = embed_factor.shape[1]
    w = token_factor * layer_factor / rank  # [N, R]: row n is diag(A[j]) B[n] / R
    centred = embed_factor - embed_factor.mean(dim=0)  # [D, R]
    sigma = ((w @ centred.T).square().mean(dim=-1) + ln_eps).sqrt()  # [N]
    u = torch.cat([w / sigma[:, None], w.new_ones(w.shape[0], 1)], dim=1)
    m = torch.cat(
        [(centred.T * ln_weight) @ proj_weight.T, (ln_bias @ proj_weight.T + proj_bias)[None]],
        dim=0,
    )
    return u, m


def factor_by_svd(prefix: Tensor, cutoff: float = SVD_RELATIVE_CUTOFF) -> tuple[Tensor, Tensor]:
    """U [N, R'], M [R', D] from a materialised [N, D] prefix; dense (U = I) if R' > N / 2."""
    left, singular, right = torch.linalg.svd(prefix, full_matrices=False)
    rank = int((singular > cutoff * singular[0]).sum())
    if rank > prefix.shape[0] / 2:
        return torch.eye(prefix.shape[0], dtype=prefix.dtype, device=prefix.device), prefix
    return left[:, :rank] * singular[:rank], right[:rank]


def _pad_rank(factors: list[Tensor], dim: int) -> Tensor:
    """Stack per-layer factors, zero-padding dimension `dim` to the largest rank."""
    rank = max(f.shape[dim] for f in factors)
    padded = []
    for f in factors:
        pad = [0, 0] * (f.dim() - 1 - dim) + [0, rank - f.shape[dim]]
        padded.append(F.pad(f, pad))
    return torch.stack(padded)


def _layer_projections(block: ResidualBlock) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    weights = block.attn.in_proj_weight.detach().double().chunk(3)
    biases = block.attn.in_proj_bias.detach().double().chunk(3)
    return (weights[1], biases[1]), (weights[2], biases[2])


def materialise_prefix64(blocks: Sequence[ResidualBlock], prompts: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 prefix keys and values [J, N, D] of prompts [J, N, D]: the fold's reference."""
    keys, values = [], []
    for j in range(prompts.shape[0]):
        ln = blocks[j].ln_1
        normed = F.layer_norm(
            prompts[j].double(), ln.normalized_shape, ln.weight.double(), ln.bias.double(), ln.eps
        )
        (w_k, b_k), (w_v, b_v) = _layer_projections(blocks[j])
        keys.append(F.linear(normed, w_k, b_k))
        values.append(F.linear(normed, w_v, b_v))
    return torch.stack(keys), torch.stack(values)


def _fold_tower_closed_form(
    blocks: Sequence[ResidualBlock], layer: Tensor, token: Tensor, embed: Tensor
) -> FoldedTower:
    parts: dict[str, list[Tensor]] = {"key_u": [], "key_m": [], "value_u": [], "value_m": []}
    for j in range(layer.shape[0]):
        ln = blocks[j].ln_1
        gamma, beta = ln.weight.detach().double(), ln.bias.detach().double()
        for kind, (w, b) in zip(("key", "value"), _layer_projections(blocks[j]), strict=True):
            u, m = fold_layer_closed_form(layer[j], token, embed, gamma, beta, ln.eps, w, b)
            parts[f"{kind}_u"].append(u)
            parts[f"{kind}_m"].append(m)
    return _stack_tower(parts)


def _fold_tower_svd(blocks: Sequence[ResidualBlock], prompts: Tensor) -> FoldedTower:
    keys, values = materialise_prefix64(blocks, prompts)
    parts: dict[str, list[Tensor]] = {"key_u": [], "key_m": [], "value_u": [], "value_m": []}
    for j in range(prompts.shape[0]):
        for kind, prefix in (("key", keys[j]), ("value", values[j])):
            u, m = factor_by_svd(prefix)
            parts[f"{kind}_u"].append(u)
            parts[f"{kind}_m"].append(m)
    return _stack_tower(parts)


def _stack_tower(parts: dict[str, list[Tensor]]) -> FoldedTower:
    return FoldedTower(
        key_u=_pad_rank(parts["key_u"], 1),
        key_m=_pad_rank(parts["key_m"], 0),
        value_u=_pad_rank(parts["value_u"], 1),
        value_m=_pad_rank(parts["value_m"], 0),
    )


def fold_task(backbone: Backbone, prompts: TaskPrompts | DensePrompts) -> FoldedTask:
    """A task's float64 prefix factors for both towers, checked against the materialised prefix.

    Closed form for LPI without the interaction; SVD with it and for dense prompts. The
    backbone must hold float32 (or float64) weights: a half-precision cast would fold its
    rounded LN and projection weights into every task, so serve-time casts fold first and cast
    the factors after (server.engine).
    """
    weight = backbone.blocks("v")[0].attn.in_proj_weight
    if weight.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"fold_task needs the float32 backbone, got {weight.dtype} weights: fold against "
            "the float32 weights and cast the folded factors (FoldedTask.image.to(dtype))"
        )
    prompts64 = copy.deepcopy(prompts).double().requires_grad_(False)
    with torch.no_grad():
        prompts_v, prompts_t = prompts64()
        if isinstance(prompts64, TaskPrompts) and prompts64.interaction is None:
            image = _fold_tower_closed_form(
                backbone.blocks("v"), prompts64.A, prompts64.B_v, prompts64.C_v
            )
            text = _fold_tower_closed_form(
                backbone.blocks("t"), prompts64.A, prompts64.B_t, prompts64.C_t
            )
        else:
            image = _fold_tower_svd(backbone.blocks("v"), prompts_v)
            text = _fold_tower_svd(backbone.blocks("t"), prompts_t)
        _check_fold("image", image, materialise_prefix64(backbone.blocks("v"), prompts_v))
        _check_fold("text", text, materialise_prefix64(backbone.blocks("t"), prompts_t))
    return FoldedTask(image, text)


def relative_error(approx: Tensor, exact: Tensor) -> float:
    return float((approx - exact).norm() / exact.norm().clamp_min(1e-300))


def _check_fold(tower: str, folded: FoldedTower, exact: tuple[Tensor, Tensor]) -> None:
    for kind, approx, ref in zip(("keys", "values"), folded.materialise(), exact, strict=True):
        error = relative_error(approx, ref)
        if error >= FOLD_TOLERANCE:
            raise FoldError(f"{tower} prefix {kind}: fold relative error {error:.2e} >= 1e-5")
