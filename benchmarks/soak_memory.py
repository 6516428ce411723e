"""The soak server's resident memory: sampled once a second, and its growth after the warm-up."""

from __future__ import annotations

import contextlib
import importlib.util
import threading
import time
from pathlib import Path

MEMORY = ("rss", "rss_anon")  # the series sampled; rss_anon is None where /proc lacks it


def memory_mib(pid: int) -> dict[str, float | None]:
    """RSS and anonymous RSS of a process in MiB (anon None without /proc)."""
    status = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                status[key] = int(value.split()[0]) / 1024  # kB
    if importlib.util.find_spec("psutil") is not None:
        import psutil

        try:
            status["VmRSS"] = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error as error:
            raise OSError(str(error)) from error
    if "VmRSS" not in status:
        raise OSError(f"no RSS for process {pid}")
    return {"rss": status["VmRSS"], "rss_anon": status.get("RssAnon")}


class MemorySampler(threading.Thread):
    """(seconds since start, `memory_mib`) of a process, once per `interval`, until stopped."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, dict]] = []
        self.start_time = time.monotonic()
        self._stop_event = threading.Event()

    def run(self) -> None:
        self.start_time = time.monotonic()
        while True:
            try:
                self.samples.append((time.monotonic() - self.start_time, memory_mib(self.pid)))
            except OSError:  # the process ended
                return
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> list[tuple[float, dict]]:
        self._stop_event.set()
        if self.is_alive():
            self.join(10)
        return self.samples


def growth(series: list[tuple[float, float]], warmup_s: float) -> dict:
    """The first sample after the warm-up against the last one (MiB), and the peak."""
    after = [mib for t, mib in series if t >= warmup_s]
    if not after:
        return dict.fromkeys(("warm_mib", "end_mib", "peak_mib", "growth_mib", "growth_pct"))
    warm, end = after[0], after[-1]
    return {
        "warm_mib": warm,
        "end_mib": end,
        "peak_mib": max(mib for _, mib in series),
        "growth_mib": end - warm,
        "growth_pct": 100 * (end - warm) / warm,
    }
