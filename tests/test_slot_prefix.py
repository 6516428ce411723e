"""`SlotPrefix.materialise` (the serving path off the fused kernel) against a per-row loop.

Each case lays rows over the pool differently, because the method takes a different route for
each: one task (a stride-0 view), rows of consecutive slots in slot order (no gather at all),
consecutive slots in another order (one gather of the product), slots with gaps (a gather of
the factors too), rows without a task (slot -1). The reference multiplies each row's own
factors in float64; the same float32 products summed in another order differ by ~1e-6.
"""

from __future__ import annotations

import pytest
import torch

import lpi
from kernels import TaskSlotPool

LAYERS, SLOTS, TOKENS, RANK, WIDTH = 3, 8, 4, 5, 16
TOLERANCE = 1e-5  # float32 products of rank 5 against float64, unit-scale factors


@pytest.fixture
def pool() -> TaskSlotPool:
    generator = torch.Generator().manual_seed(11)
    pool = TaskSlotPool(LAYERS, SLOTS, TOKENS, RANK, WIDTH)
    for slot in range(SLOTS):  # task t in slot t: the pool hands out the lowest free slot
        rank = 1 + slot % RANK  # every rank, zero-padded to the pool's
        factors = [
            torch.randn(LAYERS, TOKENS, rank, generator=generator),
            torch.randn(LAYERS, rank, WIDTH, generator=generator),
            torch.randn(LAYERS, TOKENS, rank, generator=generator),
            torch.randn(LAYERS, rank, WIDTH, generator=generator),
        ]
        assert pool.add(f"t{slot}", *factors) == slot
    return pool


def per_row(pool: TaskSlotPool, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[J, B, N, D] keys and values, one row at a time in float64 (slot -1 reads slot 0)."""
    keys, values = [], []
    for slot in slots:
        s = max(slot, 0)
        keys.append(pool.U_K[:, s].double() @ pool.M_K[:, s].double())
        values.append(pool.U_V[:, s].double() @ pool.M_V[:, s].double())
    return torch.stack(keys, dim=1), torch.stack(values, dim=1)


@pytest.mark.parametrize(
    "slots",
    [
        [3, 3, 3],  # one task
        [0, 1, 2, 3, 4, 5, 6, 7],  # every row its own consecutive slot, in order: no gather
        [2, 3, 4],  # consecutive, starting past slot 0
        [4, 2, 3, 2],  # consecutive slots, rows in another order and repeated
        [6, 1, 6, 4],  # slots with gaps
        [5, -1, 7, -1],  # rows without a task
        [-1, 0, 1],  # -1 and slot 0 share slot 0's rows
    ],
)
def test_materialise_equals_each_rows_own_product(pool, slots):
    prefix = lpi.SlotPrefix(torch.tensor(slots, dtype=torch.int32), pool).materialise()
    keys, values = per_row(pool, slots)
    assert prefix.keys.shape == (LAYERS, len(slots), TOKENS, WIDTH)
    assert (prefix.keys.double() - keys).abs().max() <= TOLERANCE
    assert (prefix.values.double() - values).abs().max() <= TOLERANCE
    if len(set(slots)) == 1:  # one task: its rows share one [J, N, D], a stride-0 view
        assert prefix.keys.stride(1) == 0 and prefix.values.stride(1) == 0
    if min(slots) >= 0:
        assert prefix.active is None
    else:
        assert prefix.active.tolist() == [slot >= 0 for slot in slots]


def test_materialise_reads_the_pool_as_it_is_now(pool):
    """No stale copy: a slot rewritten in place is seen by the next batch."""
    slots = torch.tensor([0, 1, 2], dtype=torch.int32)
    before = lpi.SlotPrefix(slots, pool).materialise().keys.clone()
    generator = torch.Generator().manual_seed(12)
    factors = [
        torch.randn(LAYERS, TOKENS, RANK, generator=generator),
        torch.randn(LAYERS, RANK, WIDTH, generator=generator),
        torch.randn(LAYERS, TOKENS, RANK, generator=generator),
        torch.randn(LAYERS, RANK, WIDTH, generator=generator),
    ]
    assert pool.replace("t1", *factors) == 1  # no lease: rewritten in place
    after = lpi.SlotPrefix(slots, pool).materialise()
    keys, _ = per_row(pool, [0, 1, 2])
    assert (after.keys.double() - keys).abs().max() <= TOLERANCE
    assert torch.equal(after.keys[:, 0], before[:, 0])
    assert not torch.allclose(after.keys[:, 1], before[:, 1])
