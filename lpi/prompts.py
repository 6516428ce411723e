"""One task's deep prompts as low-rank CP factors, with the cross-modal interaction (METHOD.md §2).

    P_m[j] = (1/R) * B_m @ diag(A[j]) @ C_m.T             # N x D_m, m in {v, t}

`A` (J x R) is shared by both modalities; `B_m` (N x R) and `C_m` (D_m x R) are specific to
each. Dimensions: J prompted layers, N prompt tokens, R rank, D_v / D_t tower widths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lpi.config import PromptConfig
from lpi.interaction import PromptInteraction
from lpi.prefix import Prefix, batch_prefix, task_prefix

if TYPE_CHECKING:
    from lpi.backbone import Backbone


def cp_prompts(layer: Tensor, token: Tensor, embed: Tensor) -> Tensor:
    """(1/R) sum_r A[j,r] B[n,r] C[d,r]: [J,R], [N,R], [D,R] -> [J, N, D]."""
    return torch.einsum("jr,nr,dr->jnd", layer, token, embed) / layer.shape[1]


class TaskPrompts(nn.Module):
    """The trainable parameters of one task: five factors and, optionally, the interaction."""

    def __init__(self, config: PromptConfig, vision_width: int, text_width: int):
        super().__init__()
        self.config = config
        self.vision_width, self.text_width = vision_width, text_width
        J, N, R = config.layers, config.tokens, config.rank
        self.A = nn.Parameter(torch.randn(J, R) * config.init_std)  # shared layer factor
        self.B_v = nn.Parameter(torch.randn(N, R) * config.init_std)  # token factors
        self.B_t = nn.Parameter(torch.randn(N, R) * config.init_std)
        self.C_v = nn.Parameter(torch.randn(vision_width, R) * config.init_std)  # embedding
        self.C_t = nn.Parameter(torch.randn(text_width, R) * config.init_std)
        self.interaction = (
            PromptInteraction(J, vision_width, text_width, config.interaction_rank, config.alpha)
            if config.interaction
            else None
        )

    @classmethod
    def for_backbone(cls, config: PromptConfig, backbone: Backbone) -> TaskPrompts:
        config.check_fits(backbone.config)
        return cls(config, backbone.config.vision.width, backbone.config.text.width)

    def raw_prompts(self) -> tuple[Tensor, Tensor]:
        """P_v [J, N, D_v] and P_t [J, N, D_t] before the interaction."""
        return cp_prompts(self.A, self.B_v, self.C_v), cp_prompts(self.A, self.B_t, self.C_t)

    def forward(self) -> tuple[Tensor, Tensor]:
        """P'_v [J, N, D_v] and P'_t [J, N, D_t]: the prompts the encoders see."""
        prompts_v, prompts_t = self.raw_prompts()
        if self.interaction is None:
            return prompts_v, prompts_t
        interacted: tuple[Tensor, Tensor] = self.interaction(prompts_v, prompts_t)
        return interacted

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class DensePrompts(nn.Module):
    """Baseline: full per-layer prompts with no decomposition (as in S-Prompts), same shapes.

    Initialised at the scale LPI's factors give (std about 0.0625 at R = 4), so the baselines
    start alike. It also holds prompts trained elsewhere (`from_tensors`).
    """

    def __init__(self, config: PromptConfig, vision_width: int, text_width: int):
        super().__init__()
        self.config = config
        self.vision_width, self.text_width = vision_width, text_width
        std = config.init_std**3 / config.rank**0.5
        shape = (config.layers, config.tokens)
        self.P_v = nn.Parameter(torch.randn(*shape, vision_width) * std)  # [J, N, D_v]
        self.P_t = nn.Parameter(torch.randn(*shape, text_width) * std)  # [J, N, D_t]

    @classmethod
    def for_backbone(cls, config: PromptConfig, backbone: Backbone) -> DensePrompts:
        config.check_fits(backbone.config)
        return cls(config, backbone.config.vision.width, backbone.config.text.width)

    @classmethod
    def from_tensors(cls, prompts_v: Tensor, prompts_t: Tensor) -> DensePrompts:
        """Wrap given prompts [J, N, D_v] and [J, N, D_t] (e.g. imported from elsewhere)."""
        if prompts_v.dim() != 3 or prompts_v.shape[:2] != prompts_t.shape[:2]:
            raise ValueError(
                "dense prompts must be [J, N, D_v] and [J, N, D_t] with the same J and N, got "
                f"{tuple(prompts_v.shape)} and {tuple(prompts_t.shape)}"
            )
        layers, tokens = prompts_v.shape[:2]
        config = PromptConfig(layers=layers, tokens=tokens, interaction=False)
        module = cls(config, prompts_v.shape[2], prompts_t.shape[2])
        with torch.no_grad():
            module.P_v.copy_(prompts_v)
            module.P_t.copy_(prompts_t)
        return module

    def raw_prompts(self) -> tuple[Tensor, Tensor]:
        return self.P_v, self.P_t

    def forward(self) -> tuple[Tensor, Tensor]:
        return self.P_v, self.P_t

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class PromptBank(nn.Module):
    """Every task's prompts by name; builds the prefixes of a batch that mixes tasks."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks = nn.ModuleDict()

    def add(self, name: str, prompts: TaskPrompts | DensePrompts) -> None:
        if name in self.tasks:
            raise ValueError(f"task {name!r} is already in the bank")
        self.tasks[name] = prompts

    def names(self) -> list[str]:
        return list(self.tasks.keys())

    def prefixes(
        self, backbone: Backbone, row_tasks: Sequence[str | None]
    ) -> tuple[Prefix, Prefix]:
        """Image and text prefixes for rows naming their task (None: the bare backbone)."""
        if len(row_tasks) == 0:
            raise ValueError("row_tasks is empty")
        unknown = sorted({t for t in row_tasks if t is not None and t not in self.tasks})
        if unknown:
            raise KeyError(f"unknown tasks {unknown}; the bank holds {self.names()}")
        used = sorted({t for t in row_tasks if t is not None})
        if not used:
            raise ValueError("no row names a task: call the backbone with prefix=None")
        slot = {name: index for index, name in enumerate(used)}
        prefixes = [task_prefix(backbone, *self.tasks[name]()) for name in used]
        rows = torch.tensor([slot.get(t, -1) if t else -1 for t in row_tasks])
        return batch_prefix(prefixes, rows.to(prefixes[0].image_keys.device))
