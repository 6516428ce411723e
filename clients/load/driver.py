"""One HTTP client sending requests and swaps, timed on the run's clock: closed-loop workers
under a request budget, and the checks of each answer (error kinds, Retry-After, shapes)."""

from __future__ import annotations

import asyncio
import time

import httpx

from clients.errors import parse_retry_after
from clients.load.config import LoadConfig
from clients.load.inputs import Request, Workload
from clients.load.metrics import prometheus_sums
from clients.load.records import Sample, Swap
from wire import schema

MAX_RETRY_SLEEP_S = 1.0  # a worker told to retry later waits at most this long


class Budget:
    """How many more requests may start: a count, or until a deadline."""

    def __init__(self, requests: int | None, deadline: float | None) -> None:
        if requests is None and deadline is None:
            raise ValueError("a budget needs a request count or a deadline")
        self.left, self.deadline = requests, deadline

    def take(self) -> bool:
        if self.left is not None:
            if self.left <= 0:
                return False
            self.left -= 1
            return True
        assert self.deadline is not None  # one of the two is set (checked at start)
        return time.perf_counter() < self.deadline


class Driver:
    """Sends requests and swaps over one HTTP client, timed on the run's clock."""

    def __init__(self, config: LoadConfig, http: httpx.AsyncClient) -> None:
        self.config, self.http = config, http
        self.t0 = time.perf_counter()
        self.query_headers = _bearer(config.api_key)
        self.admin_headers = _bearer(config.admin_key or config.api_key)

    def clock(self) -> float:
        return time.perf_counter() - self.t0

    async def send(self, request: Request, concurrency: int) -> tuple[Sample, float | None]:
        """One request -> its sample and the Retry-After seconds of a 503 (else None)."""
        start = self.clock()
        sample = Sample(concurrency, request.op, request.task, request.items, start, start)
        try:
            response = await self.http.post(
                request.path, json=request.body, headers=self.query_headers
            )
        except httpx.TimeoutException as err:
            sample.end, sample.error = self.clock(), f"timeout {type(err).__name__}"
            return sample, None
        except httpx.TransportError as err:
            sample.end, sample.error = self.clock(), f"connection {type(err).__name__}"
            return sample, None
        sample.end, sample.status = self.clock(), response.status_code
        if response.status_code != 200:
            sample.error = _error_kind(response)
            wait = parse_retry_after(response.headers.get("retry-after"))
            return sample, (wait or 0.1) if response.status_code == 503 else None
        # Plain JSON and a few checks, not schema models: validating every float of every
        # vector would make the client, not the server, the bottleneck.
        sample.error, sample.version = _check_answer(request, response)
        return sample, None

    async def workers(
        self, workload: Workload, concurrency: int, budget: Budget, out: list[Sample] | None
    ) -> None:
        async def worker() -> None:
            while budget.take():
                sample, retry_after = await self.send(workload.next(), concurrency)
                if out is not None:
                    out.append(sample)
                if retry_after is not None:
                    await asyncio.sleep(min(retry_after, MAX_RETRY_SLEEP_S))

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def swap(
        self, task: str, artifact: str, body: bytes | None, concurrency: int, promote: bool = False
    ) -> Swap:
        """PUT a version (a server-side path, or `body` uploaded); `promote` also makes it the
        version searches use."""
        record = Swap(concurrency, task, artifact, self.clock(), 0.0)
        try:
            if body is None:
                response = await self.http.put(
                    f"/tasks/{task}",
                    json={"path": artifact, "promote": promote},
                    headers=self.admin_headers,
                )
            else:
                headers = {**self.admin_headers, "content-type": "application/octet-stream"}
                params = {"promote": "true"} if promote else None
                response = await self.http.put(
                    f"/tasks/{task}", content=body, headers=headers, params=params
                )
        except httpx.TransportError as err:
            record.end, record.error = self.clock(), f"connection {type(err).__name__}"
            return record
        record.end, record.status = self.clock(), response.status_code
        if response.status_code != 200:
            record.error = _error_kind(response)
            return record
        try:
            answer = schema.LoadTaskResponse.model_validate_json(response.content)
        except ValueError:
            record.error = "bad_response"
            return record
        record.version, record.previous = answer.task.prompt_version, answer.previous_version
        record.changed = answer.changed
        return record

    async def get_tasks(self) -> list[dict]:
        response = await self.http.get("/tasks", headers=self.query_headers)
        if response.status_code != 200:
            raise RuntimeError(f"GET /tasks: {response.status_code} {_error_kind(response)}")
        return [t.model_dump() for t in schema.TaskList.model_validate_json(response.text).tasks]

    async def batch_stats(self) -> dict[str, float]:
        """Sums of the server's batch histograms (rows, count, seconds) per modality."""
        try:
            response = await self.http.get("/metrics")
        except httpx.TransportError:
            return {}
        return prometheus_sums(response.text) if response.status_code == 200 else {}


def _bearer(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def _error_kind(response: httpx.Response) -> str:
    """'503 queue_full' from the JSON error body; the bare status when there is none."""
    try:
        kind = schema.ErrorBody.model_validate_json(response.content).error.type
    except ValueError:
        return str(response.status_code)
    return f"{response.status_code} {kind}"


def _check_answer(request: Request, response: httpx.Response) -> tuple[str | None, str | None]:
    """(error kind or None, /embed's prompt version) for a 200 answer."""
    try:
        body = response.json()
    except ValueError:
        return "bad_response", None
    if request.op == "embed":
        texts, images = body.get("text_embeddings") or [], body.get("image_embeddings") or []
        if (len(texts), len(images)) != (request.texts, request.images):
            return "bad_response", None
        return None, body.get("prompt_version")
    if request.op == "index":
        return (None if len(body.get("ids", [])) == request.items else "bad_response"), None
    return (None if isinstance(body.get("hits"), list) else "bad_response"), None
