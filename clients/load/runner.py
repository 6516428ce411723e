"""The run: seed the index when searches are drawn, then each concurrency level in turn (a
warm-up, the timed load, a swapper alongside), reading the server's batch statistics."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from clients.load.config import LoadConfig
from clients.load.driver import Budget, Driver
from clients.load.inputs import Workload
from clients.load.metrics import batch_delta
from clients.load.records import Level, Run

log = logging.getLogger("clients.load")  # one logger for the whole script


async def run(config: LoadConfig, transport: httpx.AsyncBaseTransport | None = None) -> Run:
    """Drive the server at each concurrency level in turn; returns everything recorded."""
    config.check()
    _warn_if_remote(config.url)
    limits = httpx.Limits(max_connections=max(config.concurrency) + 4)
    async with httpx.AsyncClient(
        base_url=config.url,
        timeout=config.timeout_s,
        limits=limits,
        transport=transport,
        trust_env=False,  # never send loopback load through a proxy from the environment
    ) as http:
        driver = Driver(config, http)
        infos = {info["task"]: info for info in await driver.get_tasks()}
        tasks = _chosen_tasks(config, infos)
        record = Run(config, {t: infos[t] for t in tasks})
        for info in record.tasks.values():
            record.learn(info)
        workload = Workload(config, tasks)
        uploads = _read_uploads(config)
        if config.weights.get("search", 0) > 0:
            for task in tasks:
                await driver.send(workload.seed_index(task), 0)
        try:
            for concurrency in config.concurrency:
                await _run_level(driver, workload, record, concurrency, uploads)
        finally:
            await _restore(driver, record, uploads)
        for info in await driver.get_tasks():
            if info["task"] in record.known:
                record.learn(info)
    return record


async def _run_level(
    driver: Driver, workload: Workload, record: Run, concurrency: int, uploads: dict[str, bytes]
) -> None:
    config = driver.config
    warmup = concurrency if config.warmup is None else config.warmup
    if warmup:
        await driver.workers(workload, min(concurrency, warmup), Budget(warmup, None), None)
    before = await driver.batch_stats()
    stop = asyncio.Event()
    swapper = asyncio.create_task(_swap_loop(driver, record, concurrency, uploads, stop))
    level = Level(concurrency, driver.clock(), 0.0)
    seconds = config.level_seconds
    deadline = None if seconds is None else time.perf_counter() + seconds
    try:
        await driver.workers(
            workload, concurrency, Budget(config.requests, deadline), record.samples
        )
    finally:
        level.end = driver.clock()
        stop.set()
        await swapper
    level.server = batch_delta(before, await driver.batch_stats(), level.end - level.start)
    record.levels.append(level)
    done = [s for s in record.samples if s.concurrency == concurrency]
    log.info(
        "concurrency %d: %d requests in %.1f s, %d failed",
        concurrency,
        len(done),
        level.end - level.start,
        sum(s.error is not None for s in done),
    )


async def _swap_loop(
    driver: Driver, record: Run, concurrency: int, uploads: dict[str, bytes], stop: asyncio.Event
) -> None:
    """PUT the swap artifacts in turn every interval until `stop` (continuing across levels)."""
    config = driver.config
    if config.swap_interval_s is None:
        return
    task = next(iter(record.tasks))
    while True:
        try:
            await asyncio.wait_for(stop.wait(), config.swap_interval_s)
            return
        except TimeoutError:
            pass
        artifact = config.swap_artifacts[len(record.swaps) % len(config.swap_artifacts)]
        swap = await driver.swap(task, artifact, uploads.get(artifact), concurrency)
        record.swaps.append(swap)
        if swap.version is not None:
            record.known[task].update(v for v in (swap.version, swap.previous) if v is not None)
        else:
            log.warning("swap of %s to %s failed: %s", task, artifact, swap.error)


async def _restore(driver: Driver, record: Run, uploads: dict[str, bytes]) -> None:
    """Put every swapped task back on the version it had at the start, by loading again the
    swap artifact that made that version (still loaded on the server: a quick switch)."""
    for task in sorted({w.task for w in record.swaps}):
        start = record.tasks[task]["prompt_version"]
        now = {i["task"]: i["prompt_version"] for i in await driver.get_tasks()}.get(task)
        if now in (start, None):
            continue
        made = {w.artifact: w.version for w in record.swaps if w.task == task and w.version}
        # The artifact known to make the starting version first, then any never loaded here.
        tries = [a for a, v in made.items() if v == start]
        tries += [a for a in driver.config.swap_artifacts if a not in made]
        for artifact in dict.fromkeys(tries):
            swap = await driver.swap(task, artifact, uploads.get(artifact), 0)
            record.restores.append(swap)
            if swap.version == start:
                log.info("task %s restored to version %s (%s)", task, start, artifact)
                break
        else:
            log.warning(
                "task %s is left on a version other than its starting %s: no swap "
                "artifact makes it (add that artifact to --swap-artifacts)",
                task,
                start,
            )


def _chosen_tasks(config: LoadConfig, infos: dict[str, dict]) -> list[str]:
    tasks = list(config.tasks) or sorted(infos)
    if not tasks:
        raise RuntimeError("the server has no task loaded: load one (PUT /tasks/NAME) first")
    missing = [t for t in tasks if t not in infos]
    if missing:
        raise RuntimeError(f"tasks {missing} are not loaded (loaded: {sorted(infos)})")
    return tasks


def _read_uploads(config: LoadConfig) -> dict[str, bytes]:
    if not config.upload:
        return {}
    return {path: Path(path).read_bytes() for path in config.swap_artifacts}


def _warn_if_remote(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        log.warning("%s is not a loopback address: this sends real load to another machine", url)
