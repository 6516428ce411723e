"""The task-slot pool: no reallocation, leases that defer reuse, safe replace, thread safety.

Dimensions: L layers, S slots, N prefix tokens, r a task's rank, R the pool's rank, D the width.
"""

import threading

import pytest
import torch

from kernels import NotInPoolError, PoolFullError, TaskSlotPool

L, S, N, R, D = 2, 3, 4, 5, 8


def factors(seed: int, rank: int = 3) -> list[torch.Tensor]:
    """Random U_K [L, N, r], M_K [L, r, D], U_V, M_V: never zeros, so a wrong slot shows."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in [(L, N, rank), (L, rank, D)] * 2]


def stored(pool: TaskSlotPool, slot: int) -> list[torch.Tensor]:
    return [t[:, slot].clone() for t in (pool.U_K, pool.M_K, pool.U_V, pool.M_V)]


def prefix_k(pool: TaskSlotPool, slot: int) -> torch.Tensor:
    """The K prefix the kernel would rebuild from the slot: [L, N, D]."""
    return pool.U_K[:, slot] @ pool.M_K[:, slot]


@pytest.fixture
def pool() -> TaskSlotPool:
    return TaskSlotPool(L, S, N, R, D)


def test_shapes_and_zero_padded_rank(pool):
    assert pool.U_K.shape == (L, S, N, R) and pool.M_V.shape == (L, S, R, D)
    U_K, M_K, U_V, M_V = factors(0, rank=2)
    slot = pool.add("cars", U_K, M_K, U_V, M_V)
    assert torch.equal(pool.U_K[:, slot, :, :2], U_K)
    assert torch.equal(pool.U_K[:, slot, :, 2:], torch.zeros(L, N, R - 2))
    assert torch.equal(pool.M_V[:, slot, 2:], torch.zeros(L, R - 2, D))
    # Zero padding is exact: the rebuilt prefix is U @ M of the task's own rank, bit for bit up to
    # summation order over three extra zero terms.
    torch.testing.assert_close(prefix_k(pool, slot), U_K @ M_K, atol=0, rtol=0)
    layer = pool.layer(1)
    assert [t.shape for t in layer] == [(S, N, R), (S, R, D), (S, N, R), (S, R, D)]


def test_add_replace_free_never_reallocate(pool):
    pointers = [t.data_ptr() for t in (pool.U_K, pool.M_K, pool.U_V, pool.M_V)]
    pool.add("a", *factors(1))
    pool.add("b", *factors(2, rank=R))
    pool.replace("a", *factors(3, rank=1))
    with pool.lease(["a", "b"]):
        pool.replace("b", *factors(4))
        pool.free("a")
    pool.add("c", *factors(5))
    assert [t.data_ptr() for t in (pool.U_K, pool.M_K, pool.U_V, pool.M_V)] == pointers


def test_freed_slot_is_reused_only_after_leases_end(pool):
    first = pool.add("a", *factors(1))
    before = stored(pool, first)
    with pool.lease(["a", None, "a"]) as slots:
        assert slots.tolist() == [first, -1, first] and slots.dtype == torch.int32
        pool.free("a")
        assert "a" not in pool
        others = {pool.add("b", *factors(2)), pool.add("c", *factors(3))}
        assert first not in others  # the leased slot is retired, not free
        with pytest.raises(PoolFullError, match="1 wait for in-flight batches"):
            pool.add("d", *factors(4))
        for got, want in zip(stored(pool, first), before, strict=True):
            assert torch.equal(got, want)  # the in-flight batch still reads "a"
    assert pool.add("d", *factors(4)) == first


def test_slot_waits_for_every_lease(pool):
    slot = pool.add("a", *factors(1))
    with pool.lease(["a"]):
        with pool.lease(["a", "a"]):
            pool.free("a")
        pool.add("b", *factors(2))
        pool.add("c", *factors(3))
        assert pool.available == 0  # the inner lease ended, the outer one still holds the slot
    assert pool.available == 1 and pool.add("d", *factors(4)) == slot


def test_replace_unleased_writes_in_place(pool):
    slot = pool.add("a", *factors(1, rank=R))
    new = factors(2, rank=1)  # a lower rank: the old rank-R columns must be zeroed, not kept
    assert pool.replace("a", *new) == slot
    torch.testing.assert_close(prefix_k(pool, slot), new[0] @ new[1], atol=0, rtol=0)
    assert not pool.U_K[:, slot, :, 1:].any() and not pool.U_V[:, slot, :, 1:].any()
    assert not pool.M_K[:, slot, 1:].any() and not pool.M_V[:, slot, 1:].any()
    pool.free("a")
    newer = factors(3, rank=2)
    assert pool.add("b", *newer) == slot
    torch.testing.assert_close(prefix_k(pool, slot), newer[0] @ newer[1], atol=0, rtol=0)


def test_replace_during_lease_keeps_the_batch_intact(pool):
    old_slot = pool.add("a", *factors(1))
    old = stored(pool, old_slot)
    new = factors(2)
    with pool.lease(["a"]) as slots:
        new_slot = pool.replace("a", *new)
        assert new_slot != old_slot and pool.slot_of("a") == new_slot
        assert int(slots[0]) == old_slot
        for got, want in zip(stored(pool, old_slot), old, strict=True):
            assert torch.equal(got, want)
        with pool.lease(["a"]) as later:
            assert int(later[0]) == new_slot  # batches started after replace see the new task
    torch.testing.assert_close(prefix_k(pool, new_slot), new[0] @ new[1], atol=0, rtol=0)
    assert pool.available == S - 1  # the old slot came back once its lease ended


def test_replace_during_lease_needs_a_free_slot():
    pool = TaskSlotPool(L, 1, N, R, D)
    pool.add("a", *factors(1))
    with pool.lease(["a"]), pytest.raises(PoolFullError):
        pool.replace("a", *factors(2))
    assert pool.slot_of("a") == 0


def test_errors(pool):
    pool.add("a", *factors(1))
    with pytest.raises(ValueError, match="already loaded"):
        pool.add("a", *factors(2))
    with pytest.raises(NotInPoolError, match="'ghost'"):
        pool.free("ghost")
    with pytest.raises(NotInPoolError):
        pool.replace("ghost", *factors(2))
    with pytest.raises(NotInPoolError), pool.lease(["a", "ghost"]):
        pass
    pool.free("a")
    assert pool.available == S  # the failed lease pinned nothing, so freeing "a" was immediate
    pool.add("a", *factors(1))
    with pytest.raises(ValueError, match=r"ranks 1\.\.5"):
        pool.add("b", *factors(2, rank=R + 1))
    U_K, M_K, U_V, M_V = factors(3)
    with pytest.raises(ValueError, match=r"U_K, M_K must be \[L, N, r\]"):
        pool.add("b", U_K[:, :-1], M_K, U_V, M_V)
    with pytest.raises(ValueError, match="U_V, M_V"):
        pool.add("b", U_K, M_K, U_V, M_V[..., :-1])
    with pytest.raises(ValueError, match="slots must be >= 1"):
        TaskSlotPool(L, 0, N, R, D)
    pool.add("b", *factors(4))
    pool.add("c", *factors(5))
    with pytest.raises(PoolFullError, match="3 of 3 slots hold tasks"):
        pool.add("d", *factors(6))
    assert sorted(pool.tasks()) == ["a", "b", "c"] and len(pool) == 3


def test_threads_share_the_pool():
    """Loaders add, replace and free while servers lease: slots never collide or leak."""
    pool = TaskSlotPool(L, 8, N, R, D)
    errors: list[BaseException] = []

    def loader(worker: int) -> None:
        for i in range(40):
            key = f"w{worker}-{i % 3}"
            try:
                if key not in pool:
                    pool.add(key, *factors(i))
                elif i % 2:
                    pool.replace(key, *factors(i))
                else:
                    pool.free(key)
            except PoolFullError:
                pass
            except BaseException as error:  # any other failure is a bug; report it
                errors.append(error)

    def server() -> None:
        for _ in range(200):
            keys = pool.tasks()[:3]
            try:
                with pool.lease(keys) as slots:
                    assert len(set(slots.tolist())) == len(set(keys))
            except NotInPoolError:
                pass  # freed between tasks() and lease(): the caller would answer 404
            except BaseException as error:
                errors.append(error)

    threads = [threading.Thread(target=loader, args=(w,)) for w in range(3)]
    threads += [threading.Thread(target=server) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    live = [pool.slot_of(key) for key in pool.tasks()]
    assert len(set(live)) == len(live)  # no two tasks share a slot
    assert pool.available == 8 - len(live)  # no lease outlived its batch, no slot leaked
