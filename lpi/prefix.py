"""Per-layer prefix keys and values: how a task's prompts reach a tower's attention (METHOD.md §3).

A task's whole effect on an encoder is, at each prompted layer j < J, N extra key/value rows
that every real token attends to. They depend on the task alone, so they are computed once per
task and gathered per row, which lets one batch mix rows of many tasks (and rows of none).

Dimensions: J prompted layers, B rows, N prompt tokens, D tower width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from kernels import TaskSlotPool
    from lpi.backbone import Backbone, ResidualBlock


@dataclass(frozen=True)
class LayerPrefix:
    """One layer's prefix for a batch: materialised keys/values per row (training, CPU)."""

    keys: Tensor  # [B, N, D]
    values: Tensor  # [B, N, D]


@dataclass(frozen=True)
class SlotLayerPrefix:
    """One layer's prefix as task slots into the pool (serving): the kernel rebuilds K_p, V_p."""

    slots: Tensor  # [B] int32, -1 = no task
    key_u: Tensor  # [S, N, R']
    key_m: Tensor  # [S, R', D]
    value_u: Tensor  # [S, N, R']
    value_m: Tensor  # [S, R', D]


@dataclass(frozen=True)
class Prefix:
    """The prefix of every prompted layer of one tower, for the rows of one batch."""

    keys: Tensor  # [J, B, N, D]
    values: Tensor  # [J, B, N, D]
    active: Tensor | None = None  # [B] bool; None: every row carries a task

    def __post_init__(self) -> None:
        if self.keys.shape != self.values.shape or self.keys.dim() != 4:
            raise ValueError(
                "prefix keys and values must both be [J, B, N, D], got "
                f"{tuple(self.keys.shape)} and {tuple(self.values.shape)}"
            )
        if self.active is not None and self.active.shape != (self.keys.shape[1],):
            raise ValueError(
                f"prefix.active must be [B={self.keys.shape[1]}], got {tuple(self.active.shape)}"
            )

    @property
    def layers(self) -> int:
        return self.keys.shape[0]

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    @property
    def width(self) -> int:
        return self.keys.shape[3]

    @property
    def tokens(self) -> int:
        return self.keys.shape[2]

    def layer(self, index: int) -> LayerPrefix | None:
        """The prefix of layer `index`, or None past the last prompted layer."""
        if index >= self.layers:
            return None
        return LayerPrefix(self.keys[index], self.values[index])


@dataclass(frozen=True)
class SlotPrefix:
    """Every prompted layer's prefix as rows' slots into a task-slot pool (METHOD.md §7).

    `pool` is a `kernels.TaskSlotPool` of one encoder; `slots` come from its `lease`, which
    keeps the slots' tasks in place until the batch has finished.
    """

    slots: Tensor  # [B] int32, -1 = no task
    pool: TaskSlotPool  # of this encoder: .layers, .tokens, .width, .layer(j)

    @property
    def layers(self) -> int:
        return self.pool.layers

    @property
    def batch(self) -> int:
        return int(self.slots.shape[0])

    @property
    def width(self) -> int:
        return self.pool.width

    def layer(self, index: int) -> SlotLayerPrefix | None:
        if index >= self.layers:
            return None
        return SlotLayerPrefix(self.slots, *self.pool.layer(index))

    def materialise(self) -> Prefix:
        """Every layer's K_p = U @ M, V_p for the batch's rows at once: the path off the kernel.

        Why: rebuilding each row's prefix in every layer cost small batches up to 1.6x the bare
        backbone. Each distinct task's [J, N, D] is computed once, in one batched product over
        layers, and shared by its rows (a batch of one task is a stride-0 view, no copy; rows of
        consecutive slots in slot order read the product as it is: gathering the factors and
        the product cost a bf16 text batch of 8 tasks 0.8 ms of a 28 ms pass). Rows with slot -1 are
        hidden by `active` (their slot-0 stand-in never reaches a softmax).
        """
        pool = self.pool
        rows = self.slots.tolist()  # [B] ints, -1 = no task: a few host ints, off the GPU path
        used = sorted({max(slot, 0) for slot in rows})  # distinct slots (-1 reads slot 0)
        if len(used) == 1:  # one task: its [J, N, D] shared by every row, a stride-0 view
            slot = used[0]
            keys = torch.matmul(pool.U_K[:, slot], pool.M_K[:, slot])  # [J, N, D]
            values = torch.matmul(pool.U_V[:, slot], pool.M_V[:, slot])
            keys = keys[:, None].expand(-1, self.batch, -1, -1)  # [J, B, N, D]
            values = values[:, None].expand(-1, self.batch, -1, -1)
        else:
            keys = torch.matmul(_slots(pool.U_K, used), _slots(pool.M_K, used))  # [J, S_u, N, D]
            values = torch.matmul(_slots(pool.U_V, used), _slots(pool.M_V, used))
            where = {slot: i for i, slot in enumerate(used)}
            row_task = [where[max(slot, 0)] for slot in rows]  # [B] indices into S_u
            if row_task != list(range(len(used))):  # else row b is task b already: no copy
                index = torch.tensor(row_task, device=keys.device)
                keys, values = keys[:, index], values[:, index]  # [J, B, N, D]
        if min(rows) >= 0:
            return Prefix(keys, values, None)
        active = torch.tensor([slot >= 0 for slot in rows], device=pool.U_K.device)  # [B]
        return Prefix(keys, values, active)


def _slots(factors: Tensor, used: list[int]) -> Tensor:
    """factors[:, used] for a pool tensor [J, S, ...]: a view when the slots are consecutive
    (the pool hands out the lowest free slots first, so they often are), else a gather."""
    if used == list(range(used[0], used[-1] + 1)):
        return factors[:, used[0] : used[-1] + 1]
    return factors[:, torch.tensor(used, device=factors.device)]


def gather_prefix(
    task_keys: Tensor,  # [S, J, N, D] per-task prefix keys
    task_values: Tensor,  # [S, J, N, D]
    rows: Tensor,  # [B] long, the row's task index into S; -1 for no task
) -> Prefix:
    """Per-row prefix from per-task keys/values: the reference path for mixed-task batches."""
    active = rows >= 0
    index = rows.clamp(min=0)
    keys = task_keys[index].transpose(0, 1)  # [J, B, N, D]
    values = task_values[index].transpose(0, 1)
    if bool(active.all()):
        return Prefix(keys, values, None)
    # Inactive rows get zeros as well as a mask, so no stale task data can leak into them.
    keep = active.view(1, -1, 1, 1).to(keys.dtype)
    return Prefix(keys * keep, values * keep, active)


@dataclass(frozen=True)
class TaskPrefix:
    """A task's prefix keys and values for both towers, each [J, N, D_m]."""

    image_keys: Tensor
    image_values: Tensor
    text_keys: Tensor
    text_values: Tensor


def tower_prefix(blocks: list[ResidualBlock], prompts: Tensor) -> tuple[Tensor, Tensor]:
    """K_p[j] = LN1_j(P'[j]) W_k[j] + b_k[j] (and V_p) for j < J: [J, N, D] -> 2 x [J, N, D]."""
    pairs = [blocks[j].prefix_keys_values(prompts[j]) for j in range(prompts.shape[0])]
    return torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])


def task_prefix(backbone: Backbone, prompts_v: Tensor, prompts_t: Tensor) -> TaskPrefix:
    """The reference path from a task's prompts P'_v, P'_t to its prefix keys and values."""
    image_keys, image_values = tower_prefix(backbone.blocks("v"), prompts_v)
    text_keys, text_values = tower_prefix(backbone.blocks("t"), prompts_t)
    return TaskPrefix(image_keys, image_values, text_keys, text_values)


def batch_prefix(tasks: list[TaskPrefix], rows: Tensor) -> tuple[Prefix, Prefix]:
    """Image and text prefixes for a batch whose row b belongs to tasks[rows[b]] (-1: none)."""
    if not tasks:
        raise ValueError("batch_prefix needs at least one task")
    shapes = {(t.image_keys.shape, t.text_keys.shape) for t in tasks}
    if len(shapes) > 1:
        raise ValueError(f"tasks in one batch must share J and N; got shapes {sorted(shapes)}")
    if int(rows.max()) >= len(tasks) or int(rows.min()) < -1:
        raise ValueError(f"rows must lie in [-1, {len(tasks)}), got {rows.tolist()}")
    image = gather_prefix(
        torch.stack([t.image_keys for t in tasks]),
        torch.stack([t.image_values for t in tasks]),
        rows,
    )
    text = gather_prefix(
        torch.stack([t.text_keys for t in tasks]),
        torch.stack([t.text_values for t in tasks]),
        rows,
    )
    return image, text
