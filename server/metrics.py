"""Prometheus metrics of one app instance (its own registry: no module-level state).

Task labels only ever hold loaded task names (or "-"), so a client sending random task names
cannot grow the number of series without bound.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
NO_TASK = "-"


class Metrics:
    """Requests and latency per route and task, batches, queue depth, tasks, swaps."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lpi_requests", "HTTP requests answered", ["route", "task", "status"], registry=r
        )
        self.latency = Histogram(
            "lpi_request_seconds",
            "Request latency",
            ["route", "task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "lpi_batch_rows", "Rows per model batch", ["modality"], buckets=ROW_BUCKETS, registry=r
        )
        self.batch_tasks = Histogram(
            "lpi_batch_tasks",
            "Distinct tasks per model batch",
            ["modality"],
            buckets=ROW_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "lpi_batch_seconds",
            "Model time per batch",
            ["modality"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_rows = Gauge("lpi_queue_rows", "Rows waiting for a batch", registry=r)
        self.rejected = Counter(
            "lpi_rejected_rows", "Rows refused because the queue was full", registry=r
        )
        self.tasks_loaded = Gauge("lpi_tasks_loaded", "Tasks being served", registry=r)
        self.versions_loaded = Gauge(
            "lpi_prompt_versions_loaded", "Prompt versions held by the engine", registry=r
        )
        self.swaps = Counter("lpi_task_swaps", "Task loads that changed a version", registry=r)
        self.dtype_mismatch = Counter(
            "lpi_search_dtype_mismatch",
            "Searches whose query was computed in another dtype than the stored vectors",
            ["task", "made_by", "searched_with"],
            registry=r,
        )
        self.swap_seconds = Histogram(
            "lpi_task_swap_seconds",
            "Time to load or replace a task",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def watch_builds(self, store) -> None:
        """Index builds of the store (edge with background builds): phase, age and points of
        each collection's latest build, and finished builds by outcome."""
        builder = getattr(store, "builder", None)
        if builder is None:
            return
        r = self.registry
        phase = Gauge(
            "lpi_store_build_phase",
            "1 on the phase of each collection's latest index build",
            ["collection", "phase"],
            registry=r,
        )
        seconds = Gauge(
            "lpi_store_build_seconds",
            "Seconds the latest index build has run",
            ["collection"],
            registry=r,
        )
        points = Gauge(
            "lpi_store_build_points",
            "Points the latest index build indexes",
            ["collection"],
            registry=r,
        )
        finished = Counter("lpi_store_builds", "Finished index builds", ["outcome"], registry=r)

        def changed(status) -> None:
            for name in (
                "queued",
                "copying",
                "indexing",
                "catching-up",
                "swapping",
                "done",
                "failed",
            ):
                phase.labels(status.collection, name).set(int(status.phase == name))
            seconds.labels(status.collection).set(status.seconds)
            points.labels(status.collection).set(status.points)
            if status.phase in ("done", "failed"):
                finished.labels(status.phase).inc()

        builder.on_change = changed
        for status in builder.status_objects():
            changed(status)

    def engine_info(self, engine) -> None:
        """The runtime and the dtype it computes in (an info gauge: 1 on the labels in use)."""
        info = Gauge(
            "lpi_engine_info",
            "The model runtime, its compute dtype and intra-op threads",
            ["engine", "dtype", "threads"],
            registry=self.registry,
        )
        threads = str(getattr(engine, "threads", "") or "")
        info.labels(engine.name, getattr(engine, "dtype", "float32"), threads).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
