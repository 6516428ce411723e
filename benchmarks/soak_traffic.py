"""The soak's traffic: its request mix as `clients.load` requests, sent by the load script's
driver (closed-loop workers) beside a round-robin swapper with promote."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np

from clients.load import Budget, Driver, LoadConfig, Request, Sample, Swap

if TYPE_CHECKING:
    from soak import SoakConfig

OPS = ("embed", "search", "index")
WEIGHTS = {"embed": 0.5, "search": 0.3, "index": 0.2}
INDEX_ITEMS = 4  # items per /index request
REQUEST_TIMEOUT_S = 60.0
WORDS = (
    "red",
    "green",
    "blue",
    "small",
    "large",
    "square",
    "circle",
    "star",
    "stripes",
    "dots",
    "on",
    "a",
    "grey",
    "white",
    "field",
)


def version_pairs(inbox: Path) -> list[tuple[str, str]]:
    """(lpi/X, dense/X) paths relative to the inbox, for every X exported by both methods."""
    pairs = [
        (f"lpi/{path.name}", f"dense/{path.name}")
        for path in sorted((inbox / "lpi").glob("*.safetensors"))
        if (inbox / "dense" / path.name).is_file()
    ]
    if not pairs:
        raise FileNotFoundError(f"{inbox}: no lpi/X.safetensors with a dense/X.safetensors")
    return pairs


@dataclass
class Traffic:
    """What the run sent, as `clients.load` records: times in seconds since the traffic began."""

    records: list[Sample] = field(default_factory=list)
    swaps: list[Swap] = field(default_factory=list)


class Inputs:
    """Synthetic captions and PNGs, made once."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self.captions = [" ".join(rng.choices(WORDS, k=rng.randint(2, 8))) for _ in range(64)]
        self.images = [_png(np.random.default_rng(seed + i)) for i in range(8)]


def _png(rng: np.random.Generator) -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def request_body(op: str, task: str, rng: random.Random, inputs: Inputs, id_space: int) -> dict:
    if op == "embed":
        body = {"task": task, "texts": rng.sample(inputs.captions, 2)}
        if rng.random() < 0.25:
            body["images"] = [rng.choice(inputs.images)]
        return body
    if op == "search":
        body = {"task": task, "query": {"text": rng.choice(inputs.captions)}, "top_k": 10}
        if rng.random() < 0.25:
            body["filter"] = {"n": rng.randrange(10)}
        return body
    ids = rng.sample(range(id_space), INDEX_ITEMS)
    items = [
        {"id": f"s{i}", "text": rng.choice(inputs.captions), "payload": {"n": i % 10}} for i in ids
    ]
    return {"task": task, "items": items}


class SoakWorkload:
    """The soak's mix as `clients.load` requests: filtered searches, and /index ids drawn from
    a bounded space per task so the store stops growing (the load script's own mix has
    neither)."""

    def __init__(self, config: SoakConfig, tasks: list[str]) -> None:
        self.rng, self.inputs = random.Random(config.seed), Inputs(config.seed)
        self.tasks, self.id_space = tasks, config.id_space

    def next(self) -> Request:
        op = self.rng.choices(OPS, [WEIGHTS[op] for op in OPS])[0]
        task = self.rng.choice(self.tasks)
        body = request_body(op, task, self.rng, self.inputs, self.id_space)
        if op == "embed":
            texts, images = len(body["texts"]), len(body.get("images", []))
        else:  # a search's query is one text; an index request's items are all texts
            texts, images = (1 if op == "search" else len(body["items"])), 0
        return Request(op, task, f"/{op}", body, texts, images)


async def drive(url: str, config: SoakConfig, versions: dict[str, dict[str, str]]) -> Traffic:
    """`clients.load` workers and a round-robin swapper against `url` for the duration.

    `versions`: task -> prompt version -> artifact path (inbox-relative). An /embed answer or
    a swap naming a version other than the expected ones gets error "version". Workers told
    503 wait for its Retry-After (at most a second), as the load script's do.
    """
    traffic, tasks = Traffic(), sorted(versions)
    load = LoadConfig(
        url=url,
        tasks=tuple(tasks),
        concurrency=(config.concurrency,),
        weights=WEIGHTS,
        duration_s=config.duration_s,
        timeout_s=REQUEST_TIMEOUT_S,
        seed=config.seed,
    ).check()
    limits = httpx.Limits(max_connections=config.concurrency + 4)
    async with httpx.AsyncClient(
        base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits, trust_env=False
    ) as http:
        driver = Driver(load, http)
        active = {info["task"]: info["prompt_version"] for info in await driver.get_tasks()}
        workload = SoakWorkload(config, tasks)
        start = driver.clock()
        budget = Budget(None, time.perf_counter() + config.duration_s)

        async def swapper() -> None:
            for n in itertools.count():
                wake = start + (n + 1) * config.swap_interval_s
                if wake >= start + config.duration_s:
                    return
                await asyncio.sleep(max(0.0, wake - driver.clock()))
                task = tasks[n % len(tasks)]
                target = next(v for v in versions[task] if v != active[task])
                path = versions[task][target]
                swap = await driver.swap(task, path, None, config.concurrency, config.promote)
                if swap.error is None:
                    if swap.version != target:
                        swap.error = "version"
                    active[task] = target
                traffic.swaps.append(swap)

        workers = driver.workers(workload, config.concurrency, budget, traffic.records)
        await asyncio.gather(swapper(), workers)
    for record in [*traffic.records, *traffic.swaps]:  # on the traffic's clock
        record.start, record.end = record.start - start, record.end - start
    for sample in traffic.records:
        answered = sample.op == "embed" and sample.error is None
        if answered and sample.version not in versions[sample.task]:
            sample.error = "version"
    return traffic


async def load_tasks(url: str, config: SoakConfig) -> dict[str, dict[str, str]]:
    """Load soak0..N-1 (the LPI artifact of a source task each); task -> version -> path."""
    from safetensors import safe_open  # the header alone: no torch in the driver

    pairs = version_pairs(config.inbox)
    versions = {}
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, trust_env=False) as http:
        for i in range(config.tasks):
            task, pair = f"soak{i}", pairs[i % len(pairs)]
            response = await http.put(f"/tasks/{task}", json={"path": pair[0]})
            response.raise_for_status()
            versions[task] = {}
            for relative in pair:
                with safe_open(str(config.inbox / relative), framework="np") as handle:
                    version = json.loads(handle.metadata()["prompt_version"])
                versions[task][version] = relative
    return versions
