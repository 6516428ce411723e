"""Search quality and memory as settings: HNSW parameters, int8 quantisation, on-disk vectors.

HNSW trades recall for speed through three numbers: `m` (graph degree), `ef_construct` (the
candidate list while building) and `hnsw_ef` (the candidate list while searching). Qdrant's
own defaults (16, 100, ef = ef_construct) give recall@10 of 0.895 at 200,000 clustered vectors
of size 512; the defaults here were chosen from `benchmarks/store.py` runs at 200,000 and
1,000,000 points: with m 32 and ef_construct 256, ef 512 gave 0.989 at 1M and ef 1024 0.996
(p99 3 ms with int8), so ef is 1024 (README, "Vector store at scale"). Collections under
`exact_below` points are searched exactly, as is any request with `exact=True` (audits). int8
quantisation keeps one byte per component in RAM and rescores the best `oversampling` x top_k
candidates on the original float32 vectors, which `on_disk` leaves in memory-mapped files.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from server.store.contract import InvalidInputError

Quantization = Literal["none", "int8"]
QUANTIZATIONS: tuple[Quantization, ...] = ("none", "int8")

# (low, high) of each integer setting: Qdrant refuses m > 0 below 4 in practice and graphs past
# these bounds cost memory or build time for no measured gain.
RANGES = {
    "m": (4, 128),
    "ef_construct": (4, 4096),
    "hnsw_ef": (1, 4096),
    "exact_below": (0, 10_000_000),
    "shard_number": (1, 1024),
    "replication_factor": (1, 16),
}


@dataclass(frozen=True)
class IndexSettings:
    """How a collection is built; fixed when the collection is created."""

    m: int = 32
    ef_construct: int = 256
    hnsw_ef: int = 1024
    exact_below: int = 20_000
    quantization: Quantization = "int8"
    oversampling: float = 2.0
    on_disk: bool = False
    shard_number: int = 1  # Qdrant server only
    replication_factor: int = 1  # Qdrant server only

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name in RANGES:
                check_range(item.name, value)
        if self.quantization not in QUANTIZATIONS:
            raise InvalidInputError(
                f"quantization: {self.quantization!r} is not one of {QUANTIZATIONS}",
                "quantization",
            )
        if not isinstance(self.oversampling, int | float) or not 1.0 <= self.oversampling <= 16:
            raise InvalidInputError(
                f"oversampling: {self.oversampling!r} is not a number in [1, 16]", "oversampling"
            )

    def full_scan_kb(self, dim: int) -> int:
        """Qdrant's full_scan_threshold (KB of vectors) for `exact_below` points of size D."""
        return max(1, self.exact_below * dim * 4 // 1024)


@dataclass(frozen=True)
class SearchOptions:
    """Per request: `exact` for audits, `hnsw_ef` to trade speed for recall (None: default),
    `quantized=False` to walk the graph on the original vectors even where an int8 copy
    exists (measures what quantisation costs in recall)."""

    exact: bool = False
    hnsw_ef: int | None = None
    quantized: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.exact, bool):
            raise InvalidInputError(f"exact: {self.exact!r} is not a boolean", "exact")
        if self.hnsw_ef is not None:
            check_range("hnsw_ef", self.hnsw_ef)


def check_range(name: str, value: object) -> int:
    low, high = RANGES[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInputError(f"{name}: {value!r} is not an integer in [{low}, {high}]", name)
    return value
