"""Stopping and watching a long job from another thread.

Data generation, pretraining and training take a `Control`: they call `step(done, total)`
between steps, which raises `Cancelled` once the cancel event is set (so a server stops within
one step of a signal) and reports the fraction done. A job that is cancelled records nothing
half-done: training saves a task only after it finished, and the bundle builder renames its
folder into place only when complete.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

Report = Callable[[str, float], None]  # (what is running, fraction of the whole job done)


class Cancelled(Exception):
    """The job was asked to stop and stopped between two steps."""


@dataclass(frozen=True)
class Control:
    """A cancel event and a progress callback, for one job or a part of it.

    `part(start, end, label)` hands a sub-job the range [start, end] of this job's progress, so
    nested jobs report one fraction of the whole that grows from 0 to 1.
    """

    cancel: threading.Event | None = None
    report: Report | None = None
    label: str = ""
    start: float = 0.0
    end: float = 1.0

    def check(self) -> None:
        """Raise `Cancelled` if the job was asked to stop."""
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"cancelled during {self.label or 'the job'}")

    def step(self, done: float, total: float) -> None:
        """Between two steps: stop if asked to, else report `done / total` of this part."""
        self.check()
        if self.report is not None:
            fraction = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
            self.report(self.label, self.start + (self.end - self.start) * fraction)

    def part(self, start: float, end: float, label: str | None = None) -> Control:
        """The control of a sub-job covering [start, end] (fractions of this part)."""
        span = self.end - self.start
        name = self.label if label is None else " ".join(p for p in (self.label, label) if p)
        return replace(
            self, label=name, start=self.start + span * start, end=self.start + span * end
        )


NO_CONTROL = Control()
