"""The task-slot pool: each loaded task's prefix factors, preallocated per tower (METHOD.md §6-7).

For each prompted layer the kernel reads U_K[j]: [S, N, R], M_K[j]: [S, R, D] (and the V twins);
a row of a batch names its task by slot. Tasks come and go while batches run, so:

- the pool tensors are allocated once and never reallocated (pointers captured by in-flight
  work or CUDA graphs stay valid); a task of rank r <= R is written zero-padded to R;
- a batch holds a *lease* on the slots it reads; `free` and `replace` of a leased task never
  touch its slot: it is retired and returns to the free list when its last lease ends;
- one lock guards the bookkeeping and the writes, so loading threads and serving threads mix.

Dimensions: L layers, S slots, N prefix tokens, R the padded rank R', D = H*d the width.
A lease ends when its `with` block exits. On CUDA, end it only after the batch's kernels are
ordered before any later write (the same stream, or after synchronising), as when results are
copied to the host inside the block.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor


class PoolFullError(RuntimeError):
    """Every slot holds a live task or one still leased by an in-flight batch."""


class NotInPoolError(KeyError):
    """The key is not loaded in the pool (the server's own "unknown task" is the store's and
    the registry's; this one is the slot pool's, a lookup that failed)."""


class TaskSlotPool:
    """Preallocated U/M factors of up to S tasks for L layers of one encoder."""

    def __init__(
        self,
        layers: int,
        slots: int,
        tokens: int,
        rank: int,
        width: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        for name, size in (("layers", layers), ("slots", slots), ("tokens", tokens)):
            if size < 1:
                raise ValueError(f"{name} must be >= 1, got {size}")
        if rank < 1 or width < 1:
            raise ValueError(f"rank and width must be >= 1, got rank={rank}, width={width}")
        self.layers = layers
        self.slots = slots
        self.tokens = tokens
        self.rank = rank
        self.width = width
        self.U_K = torch.zeros(layers, slots, tokens, rank, device=device, dtype=dtype)  # [L,S,N,R]
        self.M_K = torch.zeros(layers, slots, rank, width, device=device, dtype=dtype)  # [L,S,R,D]
        self.U_V = torch.zeros_like(self.U_K)
        self.M_V = torch.zeros_like(self.M_K)
        self._lock = threading.Lock()
        self._free = list(range(slots))  # a heap: the lowest free slot is reused first
        self._slot_of: dict[Hashable, int] = {}
        self._leases = [0] * slots  # in-flight batch rows reading each slot
        self._retired: set[int] = set()  # unmapped slots waiting for their leases to end

    @property
    def device(self) -> torch.device:
        return self.U_K.device

    def layer(self, j: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The kernel's pool arguments for layer j: U_K, M_K, U_V, M_V of [S, N, R], [S, R, D]."""
        return self.U_K[j], self.M_K[j], self.U_V[j], self.M_V[j]

    def add(self, task_key: Hashable, U_K: Tensor, M_K: Tensor, U_V: Tensor, M_V: Tensor) -> int:
        """Load a task's factors ([L, N, r], [L, r, D], r <= R) into a free slot; return it."""
        self._check_factors(U_K, M_K, U_V, M_V)
        with self._lock:
            if task_key in self._slot_of:
                raise ValueError(f"task {task_key!r} is already loaded; use replace()")
            slot = self._take_slot(task_key)
            self._write(slot, U_K, M_K, U_V, M_V)
            self._slot_of[task_key] = slot
            return slot

    def replace(
        self, task_key: Hashable, U_K: Tensor, M_K: Tensor, U_V: Tensor, M_V: Tensor
    ) -> int:
        """New factors for a loaded task; leased slots are left intact for their batches."""
        self._check_factors(U_K, M_K, U_V, M_V)
        with self._lock:
            old = self._lookup(task_key)
            slot = old if self._leases[old] == 0 else self._take_slot(task_key)
            self._write(slot, U_K, M_K, U_V, M_V)
            self._slot_of[task_key] = slot
            if slot != old:
                self._retire(old)
            return slot

    def free(self, task_key: Hashable) -> None:
        """Unload a task; its slot is reused once every batch holding it has finished."""
        with self._lock:
            self._retire(self._lookup(task_key))
            del self._slot_of[task_key]

    @contextmanager
    def lease(self, task_keys: Sequence[Hashable | None]) -> Iterator[Tensor]:
        """Pin the slots of a batch's tasks (None = no task); yield them as [B] int32 slots."""
        with self._lock:
            slots = [-1 if key is None else self._lookup(key) for key in task_keys]
            for slot in slots:
                if slot >= 0:
                    self._leases[slot] += 1
        try:
            yield torch.tensor(slots, dtype=torch.int32, device=self.device)  # [B]
        finally:
            with self._lock:
                for slot in slots:
                    if slot >= 0:
                        self._release(slot)

    def slot_of(self, task_key: Hashable) -> int:
        with self._lock:
            return self._lookup(task_key)

    def tasks(self) -> list[Hashable]:
        with self._lock:
            return list(self._slot_of)

    @property
    def available(self) -> int:
        """Slots that `add` can take now."""
        with self._lock:
            return len(self._free)

    def __len__(self) -> int:
        with self._lock:
            return len(self._slot_of)

    def __contains__(self, task_key: object) -> bool:
        with self._lock:
            return task_key in self._slot_of

    def _lookup(self, task_key: Hashable) -> int:
        try:
            return self._slot_of[task_key]
        except KeyError:
            raise NotInPoolError(f"task {task_key!r} is not loaded in the pool") from None

    def _take_slot(self, task_key: Hashable) -> int:
        if not self._free:
            raise PoolFullError(
                f"no free slot for task {task_key!r}: {len(self._slot_of)} of {self.slots} "
                f"slots hold tasks, {len(self._retired)} wait for in-flight batches to finish"
            )
        return heapq.heappop(self._free)

    def _retire(self, slot: int) -> None:
        if self._leases[slot] == 0:
            heapq.heappush(self._free, slot)
        else:
            self._retired.add(slot)

    def _release(self, slot: int) -> None:
        self._leases[slot] -= 1
        if self._leases[slot] == 0 and slot in self._retired:
            self._retired.remove(slot)
            heapq.heappush(self._free, slot)

    def _write(self, slot: int, U_K: Tensor, M_K: Tensor, U_V: Tensor, M_V: Tensor) -> None:
        """Copy factors of rank r into the slot in place, zeroing ranks r..R."""
        for pool_u, pool_m, u, m in (
            (self.U_K, self.M_K, U_K, M_K),
            (self.U_V, self.M_V, U_V, M_V),
        ):
            r = u.shape[-1]
            pool_u[:, slot, :, :r].copy_(u)  # [L, N, r]
            pool_u[:, slot, :, r:].zero_()
            pool_m[:, slot, :r].copy_(m)  # [L, r, D]
            pool_m[:, slot, r:].zero_()

    def _check_factors(self, U_K: Tensor, M_K: Tensor, U_V: Tensor, M_V: Tensor) -> None:
        for name, u, m in (("K", U_K, M_K), ("V", U_V, M_V)):
            r = u.shape[-1] if u.dim() == 3 else -1
            want_u = (self.layers, self.tokens, r)
            want_m = (self.layers, r, self.width)
            if tuple(u.shape) != want_u or tuple(m.shape) != want_m:
                raise ValueError(
                    f"U_{name}, M_{name} must be [L, N, r] = [{self.layers}, {self.tokens}, r] and "
                    f"[L, r, D] = [{self.layers}, r, {self.width}]; got {tuple(u.shape)} and "
                    f"{tuple(m.shape)}"
                )
            if not 1 <= r <= self.rank:
                raise ValueError(f"U_{name} has rank {r}; this pool holds ranks 1..{self.rank}")
            if not (u.is_floating_point() and m.is_floating_point()):
                raise ValueError(f"U_{name}, M_{name} must be floating point")
