"""The cross-modal interaction (correlation module) of LPI, METHOD.md §2.

For layers j >= 1, per task, a text->image and an image->text affine map, each a CP tensor
over layers with rank R_i (the last row of F is the bias):

    W_tv[j] = (1/R_i) sum_r E_tv[j,r] outer(F_tv[:,r], G_tv[:,r])     # (D_t+1) x D_v
    P'_v[j] = LN_v((1-a) P_v[j] + a [P_t[j], 1] @ W_tv[j])              (and v <-> t)

Layer 0 is not mixed. W is never materialised: [P, 1] @ W = ((([P, 1] @ F) * E[j]) @ G.T) / R_i.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class CPAffineMap(nn.Module):
    """Per-layer affine maps D_in -> D_out stored as a rank-R_i CP tensor over layers."""

    def __init__(self, layers: int, d_in: int, d_out: int, rank: int):
        super().__init__()
        bound = 1.0 / math.sqrt(rank)
        self.E = nn.Parameter(torch.empty(layers, rank).uniform_(-bound, bound))  # [J-1, R_i]
        self.F = nn.Parameter(torch.empty(d_in + 1, rank).uniform_(-bound, bound))
        self.G = nn.Parameter(torch.empty(d_out, rank).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        """x [J-1, N, D_in] -> [x, 1] @ W[j] per layer: [J-1, N, D_out]."""
        ones = x.new_ones(*x.shape[:-1], 1)
        coords = torch.cat([x, ones], dim=-1) @ self.F  # [J-1, N, R_i]
        coords = coords * self.E[:, None, :]
        return coords @ self.G.T / self.E.shape[1]


class PromptInteraction(nn.Module):
    def __init__(self, layers: int, vision_width: int, text_width: int, rank: int, alpha: float):
        super().__init__()
        self.alpha = alpha
        self.text_to_image = CPAffineMap(layers - 1, text_width, vision_width, rank)
        self.image_to_text = CPAffineMap(layers - 1, vision_width, text_width, rank)
        self.ln_v = nn.LayerNorm(vision_width)
        self.ln_t = nn.LayerNorm(text_width)

    def forward(self, prompts_v: Tensor, prompts_t: Tensor) -> tuple[Tensor, Tensor]:
        """P_v [J, N, D_v], P_t [J, N, D_t] -> P'_v, P'_t of the same shapes."""
        a = self.alpha
        mixed_v = self.ln_v((1 - a) * prompts_v[1:] + a * self.text_to_image(prompts_t[1:]))
        mixed_t = self.ln_t((1 - a) * prompts_t[1:] + a * self.image_to_text(prompts_v[1:]))
        return (
            torch.cat([prompts_v[:1], mixed_v], dim=0),
            torch.cat([prompts_t[:1], mixed_t], dim=0),
        )
