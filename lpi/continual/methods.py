"""Training one task's prompts on a frozen backbone (METHOD.md §4, §5).

The pieces `lpi.train` composes: which prompt module a method trains, the single-task prefix
of a batch, the loss of one step, and the optimiser with its cosine schedule. The backbone
stays frozen and earlier tasks' prompts enter only detached, so only task k learns.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn
from torch.optim.optimizer import ParamsT

from lpi.config import PromptConfig
from lpi.continual import losses
from lpi.prefix import Prefix, batch_prefix, task_prefix
from lpi.prompts import DensePrompts, TaskPrompts
from lpi.tokenizer import tokenize

if TYPE_CHECKING:
    from lpi.backbone import Backbone

# Methods of METHOD.md §5: LPI, its ablations, and the baselines on the same code path.
METHODS = {
    "lpi": "LPI: low-rank prompts with interaction, layer contrast and task constraint",
    "lpi-no-interaction": "LPI without the cross-modal interaction",
    "lpi-no-layer": "LPI without the hierarchical layer contrast (L_layer)",
    "lpi-no-task": "LPI without the task contrastive constraint (L_task)",
    "dense": "dense per-task prompts of the same shape (no decomposition, as in S-Prompts)",
    "shared": "one shared LPI prompt fine-tuned task after task (shows forgetting)",
    "zero-shot": "the frozen backbone, no prompts",
}


# The peak learning rates the bench sweep chose (docs/continual_results.md). Prompts enter
# through LN1, so only Adam's step against a parameter's size matters, and LPI's factors sit
# near 0.5 where dense entries sit near 0.06: one rate for both would favour dense prompts.
LPI_LR = 0.3
DENSE_LR = 0.1


def lr_family(method: str) -> str:
    """Whose learning rate `method` takes: "dense", or "lpi" for LPI, its ablations, the shared
    prompt and zero-shot (they train LPI's factors, at the same scale, or nothing)."""
    return "dense" if method == "dense" else "lpi"


def default_lr(method: str) -> float:
    """The best peak lr found for `method`'s family (`lr_family`)."""
    return DENSE_LR if lr_family(method) == "dense" else LPI_LR


@dataclass(frozen=True)
class MethodSpec:
    dense: bool = False
    interaction: bool = True
    layer_loss: bool = True
    task_loss: bool = True
    shared: bool = False
    trains: bool = True


def method_spec(method: str) -> MethodSpec:
    specs = {
        "lpi": MethodSpec(),
        "lpi-no-interaction": MethodSpec(interaction=False),
        "lpi-no-layer": MethodSpec(layer_loss=False),
        "lpi-no-task": MethodSpec(task_loss=False),
        "dense": MethodSpec(dense=True, interaction=False),
        "shared": MethodSpec(shared=True, task_loss=False),
        "zero-shot": MethodSpec(trains=False),
    }
    if method not in specs:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return specs[method]


def new_prompts(
    method: str, config: PromptConfig, backbone: Backbone
) -> TaskPrompts | DensePrompts:
    spec = method_spec(method)
    if spec.dense:
        return DensePrompts.for_backbone(config, backbone)
    config = PromptConfig(**{**config.to_dict(), "interaction": spec.interaction})
    return TaskPrompts.for_backbone(config, backbone)


def single_task_prefix(
    backbone: Backbone, prompts_v: Tensor, prompts_t: Tensor, batch: int
) -> tuple[Prefix, Prefix]:
    """Image and text prefixes of a batch whose rows all belong to one task (differentiable)."""
    prefix = task_prefix(backbone, prompts_v, prompts_t)
    rows = torch.zeros(batch, dtype=torch.long, device=prefix.image_keys.device)
    return batch_prefix([prefix], rows)


def raw_prompts_of(prompts: nn.Module) -> tuple[Tensor, Tensor]:
    """(P_v, P_t) of a TaskPrompts or DensePrompts module (typed for callers holding a Module)."""
    raw_prompts = cast("Callable[[], tuple[Tensor, Tensor]]", prompts.raw_prompts)
    return raw_prompts()


def prompt_pair(prompts: nn.Module) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(raw P_v, P_t) and (P'_v, P'_t): the losses read the raw ones, the encoders the others."""
    raw = raw_prompts_of(prompts)
    interaction = getattr(prompts, "interaction", None)
    return raw, (interaction(*raw) if interaction is not None else raw)


def task_constraint(
    current: tuple[Tensor, Tensor], earlier: list[nn.Module], targets: Tensor
) -> Tensor | None:
    """L_task for the current task's raw prompts against detached earlier tasks' (None at k = 0)."""
    if not earlier:
        return None
    with torch.no_grad():
        old = [raw_prompts_of(module) for module in earlier]
    flat_v = torch.stack([*(v.reshape(-1) for v, _ in old), current[0].reshape(-1)])  # [K, JND]
    flat_t = torch.stack([*(t.reshape(-1) for _, t in old), current[1].reshape(-1)])
    return losses.task_constraint_loss(flat_v, flat_t, targets)


def step_loss(
    backbone: Backbone,
    prompts: nn.Module,
    pixels: Tensor,
    tokens: Tensor,
    earlier: list[nn.Module],
    targets: Tensor | None,
    spec: MethodSpec,
) -> dict[str, Tensor]:
    """The LPI loss of one batch: L_clip + 0.1 L_layer + 0.1 [k >= 1] L_task.

    `targets` is None when the run has no task similarity (L_task off)."""
    raw, interacted = prompt_pair(prompts)  # once per step
    image_prefix, text_prefix = single_task_prefix(backbone, *interacted, len(pixels))
    image = backbone.encode_image(pixels, image_prefix)
    text = backbone.encode_text(tokens, text_prefix)
    task = None
    if spec.task_loss and targets is not None:
        task = task_constraint(raw, earlier, targets)
    return losses.lpi_loss(image, text, backbone.logit_scale, *raw, task, spec.layer_loss)


def gradient_ratios(parts: dict[str, Tensor], prompts: nn.Module) -> dict[str, dict[str, float]]:
    """Per auxiliary term, per factor: |grad of its weighted term| / |grad of L_clip|.

    The weighted term (0.1 L_layer, 0.1 L_task) is what the optimiser sees. A ratio far
    below 0.01 means the term does nothing; far above 10 means it swamps retrieval.
    """
    weights = {"layer": losses.LAYER_WEIGHT, "task": losses.TASK_WEIGHT}
    named = [(n, p) for n, p in prompts.named_parameters() if "." not in n and p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]

    def norms(loss: Tensor) -> list[float]:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return [0.0 if g is None else float(g.float().norm()) for g in grads]

    clip = norms(parts["clip"])
    ratios = {}
    for term, weight in weights.items():
        if term in parts:
            term_norms = norms(weight * parts[term])
            ratios[term] = {
                n: (t / c if c > 0 else float("nan"))
                for n, t, c in zip(names, term_norms, clip, strict=True)
            }
    return ratios


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(
    parameters: ParamsT, lr: float, weight_decay: float, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    scheduler = cosine_schedule(optimizer, total_steps, max(1, total_steps // 20))
    return optimizer, scheduler


def describe_tasks(backbone: Backbone, names: list[str]) -> Tensor:
    """Frozen text features of task descriptions [K, E]: the task similarity's inputs."""
    with torch.no_grad():
        return backbone.encode_text(tokenize([name.replace("-", " ") for name in names]))
