"""The command line of `python -m clients.load`: flags to a `LoadConfig`, the run, the table."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

import httpx

import clients.load
from clients.load.config import (
    DEFAULT_DURATION_S,
    MAX_DURATION_S,
    MAX_REQUESTS,
    MODALITIES,
    LoadConfig,
    parse_op,
)
from clients.load.report import format_table, table_rows, write_report
from clients.load.runner import run
from clients.load.stats import summarise

log = logging.getLogger("clients.load")  # one logger for the whole script


def parse_args(argv: list[str] | None = None) -> tuple[LoadConfig, Path]:
    """The flags as a checked `LoadConfig` and the output folder; bad values exit with usage."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = _config(args).check()
    except ValueError as err:
        parser.error(str(err))
    return config, args.out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clients.load",
        description=clients.load.__doc__.split("\n\n")[0],
        epilog=f"--duration or --requests bounds each level (neither: {DEFAULT_DURATION_S:g} "
        "seconds). Swapped tasks are put back on their starting version at the end. Exit "
        "status: 0, or 2 when any request or swap failed, 1 when the run could not start.",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server (default: %(default)s)")
    p.add_argument(
        "--modality", choices=MODALITIES, default="text", help="what requests send (default: text)"
    )
    p.add_argument("--tasks", nargs="+", default=[], help="task names (default: all loaded)")
    p.add_argument("--items-per-request", type=int, default=1, help="texts or images (default: 1)")
    p.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1],
        help="concurrent requests; several values run one level each (default: 1)",
    )
    p.add_argument(
        "--duration",
        type=float,
        help=f"seconds per level (<= {MAX_DURATION_S:.0f}; default {DEFAULT_DURATION_S:g} "
        "unless --requests)",
    )
    p.add_argument("--requests", type=int, help=f"requests per level (<= {MAX_REQUESTS})")
    p.add_argument(
        "--op",
        default="embed",
        type=parse_op,
        help="embed, search, index, mixed (8:1:1), or weights like embed=6,search=3 "
        "(default: embed)",
    )
    p.add_argument("--swap-interval", type=float, help="seconds between task swaps (default: none)")
    p.add_argument(
        "--swap-artifacts",
        nargs="+",
        default=[],
        help="artifacts PUT in turn on the first task: paths relative to the "
        "server's artifact directory, or local files with --upload",
    )
    p.add_argument("--upload", action="store_true", help="send --swap-artifacts as bytes")
    p.add_argument(
        "--api-key",
        default=os.environ.get("LPI_API_KEY"),
        help="Bearer key for queries (default: $LPI_API_KEY)",
    )
    p.add_argument(
        "--admin-key",
        default=os.environ.get("LPI_ADMIN_KEY"),
        help="Bearer key for swaps (default: $LPI_ADMIN_KEY, else --api-key)",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default: 60)")
    p.add_argument(
        "--warmup", type=int, help="unrecorded requests per level (default: one per worker)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("load-report"),
        help="folder for the JSON report and the PNG (default: load-report)",
    )
    return p


def _config(args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(
        url=args.url,
        modality=args.modality,
        tasks=tuple(args.tasks),
        items_per_request=args.items_per_request,
        concurrency=tuple(args.concurrency),
        duration_s=args.duration,
        requests=args.requests,
        weights=args.op,
        swap_interval_s=args.swap_interval,
        swap_artifacts=tuple(args.swap_artifacts),
        upload=args.upload,
        api_key=args.api_key,
        admin_key=args.admin_key,
        timeout_s=args.timeout,
        warmup=args.warmup,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    config, out = parse_args(argv)
    try:
        record = asyncio.run(run(config))
    except (RuntimeError, httpx.TransportError, OSError) as err:
        log.error("load run failed: %s", err)
        return 1
    report = summarise(record)
    paths = write_report(report, out)
    print(format_table(table_rows(report)))
    wrote = " and ".join(str(p) for p in paths.values() if p is not None)
    print(
        f"stale versions: {report['stale_versions']} of {report['versions_checked']} checked; "
        f"wrote {wrote}"
    )
    failed = sum(sum(v["errors"].values()) + v["swaps"]["failed"] for v in report["levels"])
    return 0 if failed == 0 else 2
