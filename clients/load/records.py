"""What a run records: every request (`Sample`), every swap, every level, and the versions
each task is known to have loaded; times in seconds on the run's clock."""

from __future__ import annotations

from dataclasses import dataclass, field

from clients.load.config import LoadConfig


@dataclass
class Sample:
    """One request; times in seconds since the run began."""

    concurrency: int
    op: str
    task: str
    items: int
    start: float
    end: float
    error: str | None = None  # the kind, None when it succeeded
    version: str | None = None  # /embed's prompt_version
    status: int | None = None  # the HTTP status; None when no answer came

    @property
    def latency_ms(self) -> float:
        return (self.end - self.start) * 1000


@dataclass
class Swap:
    concurrency: int
    task: str
    artifact: str
    start: float
    end: float
    error: str | None = None
    version: str | None = None  # the task's active version afterwards
    previous: str | None = None
    changed: bool = False
    status: int | None = None  # the HTTP status; None when no answer came

    @property
    def latency_ms(self) -> float:
        return (self.end - self.start) * 1000


@dataclass
class Level:
    concurrency: int
    start: float
    end: float
    server: dict = field(default_factory=dict)  # batch statistics from /metrics, if readable


@dataclass
class Run:
    config: LoadConfig
    tasks: dict[str, dict]  # TaskInfo of each driven task at the start
    samples: list[Sample] = field(default_factory=list)
    swaps: list[Swap] = field(default_factory=list)
    levels: list[Level] = field(default_factory=list)
    known: dict[str, set[str]] = field(default_factory=dict)  # every version seen loaded
    restores: list[Swap] = field(default_factory=list)  # loads that put swapped tasks back

    def learn(self, info: dict) -> None:
        versions = self.known.setdefault(info["task"], set())
        versions.update(info["loaded_versions"])
        versions.add(info["prompt_version"])
        if info.get("serving_version"):
            versions.add(info["serving_version"])
