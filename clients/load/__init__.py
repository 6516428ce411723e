"""`python -m clients.load`: closed-loop load on a running lpi-serve server, with live task swaps.

Each of `concurrency` workers sends one request, waits for its answer and sends the next, for
`--duration` seconds or `--requests` requests per concurrency level (a list of levels is a
sweep). Requests are a weighted mix of /embed, /search and /index over the chosen tasks, with
synthetic inputs made once up front: short random captions and small PNGs of random shapes.
While the load runs, a swapper can PUT task versions alternately every `--swap-interval`
seconds and time each swap.

Every /embed answer names the prompt version that computed it; the run checks it afterwards
against every version the task is known to have loaded (error kind "version" when it is none of
them), and counts as "stale" any answer that disagrees with the version the last completed
swap made active although no swap overlapped the request (a diagnostic, not an error).

Output: a table per level (throughput, latency percentiles, errors by kind), a JSON report
written atomically (mode 0644), and a PNG of latency over time per operation with its p50 and
p99 and the swaps marked (matplotlib, optional). Swapped tasks are put back on their starting
version when the run ends. Without --duration or --requests each level lasts 10 seconds.

    python -m clients.load --concurrency 1 8 32 --duration 10 \\
        --swap-interval 0.5 --swap-artifacts lpi/a.safetensors dense/a.safetensors

The client imports only httpx, pydantic (via `wire.schema`), numpy, PIL and (for the plot)
matplotlib: it talks to the
server over HTTP and knows nothing of the model.

The package, one job a module, in the order a run uses them: config.py (`LoadConfig`),
inputs.py (synthetic captions, PNGs and requests), records.py (what a run records), driver.py
(HTTP requests, swaps and answer checks), metrics.py (the server's /metrics), runner.py (the
levels and the swapper), versions.py (version checks), stats.py (the JSON summary), report.py
(table and files), files.py (atomic writes), plot.py (the PNG), cli.py (the flags and `main`).
"""

from clients.load.cli import main, parse_args
from clients.load.config import (
    DEFAULT_DURATION_S,
    MAX_CONCURRENCY,
    MAX_DURATION_S,
    MAX_REQUESTS,
    MIXED_WEIGHTS,
    MODALITIES,
    OPS,
    LoadConfig,
    parse_op,
)
from clients.load.driver import Budget, Driver
from clients.load.inputs import Request, Workload, make_caption, make_png
from clients.load.plot import draw_latency
from clients.load.records import Level, Run, Sample, Swap
from clients.load.report import format_table, table_rows, write_json, write_report
from clients.load.runner import run
from clients.load.stats import percentiles, summarise
from clients.load.versions import check_versions

__all__ = [
    "DEFAULT_DURATION_S",
    "MAX_CONCURRENCY",
    "MAX_DURATION_S",
    "MAX_REQUESTS",
    "MIXED_WEIGHTS",
    "MODALITIES",
    "OPS",
    "Budget",
    "Driver",
    "Level",
    "LoadConfig",
    "Request",
    "Run",
    "Sample",
    "Swap",
    "Workload",
    "check_versions",
    "draw_latency",
    "format_table",
    "main",
    "make_caption",
    "make_png",
    "parse_args",
    "parse_op",
    "percentiles",
    "run",
    "summarise",
    "table_rows",
    "write_json",
    "write_report",
]
