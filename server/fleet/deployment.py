"""The Ray Serve side: the engine replica deployment, the catalog and store actors, the app.

Each replica builds `server.app.create_app` in its own process with a `FleetAssembly`: its
registry is a `FleetRegistry` over the catalog actor and the shared artifact store, its store
the Qdrant server by URL or the store actor. The app's lifespan (run by Ray Serve before the
replica counts as started) restores every catalog task, so a restarted replica is ready only
with its tasks. Every answer names its replica (`X-LPI-Replica`, `X-LPI-Replica-Pid`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from ray import serve

from server.app import Assembly, create_app
from server.fleet import routes as fleet_routes
from server.fleet.artifacts import ArtifactStore
from server.fleet.link import ActorLink
from server.fleet.registry import FleetRegistry
from server.fleet.store_actor import RemoteStore
from server.routes.deps import require_api_key
from server.settings import Settings
from wire.schema import TASK_PATTERN

log = logging.getLogger("server.fleet")

NAMESPACE = "lpi-serve"
CATALOG_ACTOR = "lpi-catalog"
STORE_ACTOR = "lpi-store"
APP_NAME = "lpi"
REPLICA_HEADER = "X-LPI-Replica"
PID_HEADER = "X-LPI-Replica-Pid"


def embedded(settings: Settings) -> bool:
    """Whether the store is opened in a process (then one actor owns it), not by URL."""
    return not settings.store.startswith(("http://", "https://"))


class FleetAssembly(Assembly):
    """A replica's store (by URL, or the store actor) and its catalog-following registry."""

    def __init__(
        self, fleet_dir: Path, working_set: int | None = None, artifacts: str | None = None
    ) -> None:
        self.fleet_dir, self.working_set = fleet_dir, working_set
        self.artifacts = artifacts or str(fleet_dir / "artifacts")  # a folder or a URL

    def open_store(self, settings: Settings):
        if not embedded(settings):
            return super().open_store(settings)
        import ray

        return RemoteStore(ray.get_actor(STORE_ACTOR, namespace=NAMESPACE))

    def registry(self, settings, engine, store, backbone, metrics):
        import ray

        link = ActorLink(ray.get_actor(CATALOG_ACTOR, namespace=NAMESPACE))
        return FleetRegistry(
            engine,
            store,
            settings.data_dir / "registry",
            backbone,
            metrics,
            drain_timeout_s=2 * settings.request_timeout_s,
            link=link,
            artifacts=ArtifactStore(
                self.artifacts,
                cache_dir=settings.data_dir / "artifact-cache",  # object storage's copies
                max_bytes=settings.max_artifact_bytes,
            ),
            working_set=self.working_set,
        )


@serve.deployment(name="engine", health_check_period_s=2, health_check_timeout_s=30)
@serve.ingress()
class EngineReplica:
    """One engine: `create_app` in this replica's process, on a private scratch folder."""

    def __init__(
        self,
        settings: Settings,
        fleet_dir: str,
        scratch_root: str | None = None,
        working_set: int | None = None,
        artifacts: str | None = None,
    ) -> None:
        # The registry's own folder (uploads, a local registry.json) is per replica and
        # scratch: the catalog and the artifact store are the truth. On a local cluster it lies
        # in the cluster's folder, which the driver removes, killed replicas' included.
        self.scratch = Path(tempfile.mkdtemp(prefix="lpi-replica-", dir=scratch_root))
        self.settings = settings.model_copy(update={"data_dir": self.scratch})
        self.fleet_dir, self.working_set = Path(fleet_dir), working_set
        self.artifacts = artifacts
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id if context else "unknown"

        # Ray Serve's model multiplexing with tasks as the models: a request whose
        # `serve_multiplexed_model_id` header names a task goes preferably to a replica that
        # reported holding it; here, the task is loaded (if cold) before the app sees it.
        # Ray's list of held tasks is a routing hint; the registry decides what is held.
        async def load_task(task: str) -> str:  # a function: Ray keeps its cache on it
            return await self._load_task(task)

        limit = working_set or -1
        self.hold_task = serve.multiplexed(max_num_models_per_replica=limit)(load_task)

    def __serve_build_asgi_app__(self):
        assembly = FleetAssembly(self.fleet_dir, self.working_set, self.artifacts)
        app = create_app(self.settings, assembly=assembly)
        app.include_router(fleet_routes.router)
        replica, pid = self.replica, str(os.getpid())

        @app.middleware("http")
        async def name_replica(request, call_next):
            task = serve.get_multiplexed_model_id()
            if task and self.working_set and re.fullmatch(TASK_PATTERN, task):
                with contextlib.suppress(Exception):  # the app answers what went wrong
                    await require_api_key(request)  # no loads on behalf of a refused caller
                    await self.hold_task(task)
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica
            response.headers[PID_HEADER] = pid
            return response

        self.fleet_app = app
        return app

    async def _load_task(self, task: str) -> str:
        """Ray's "model" for a task: its name, once this replica holds it (or gave up
        waiting: the request then gets the registry's 409 + Retry-After)."""
        service = getattr(self.fleet_app.state, "service", None)
        if service is None:  # still starting: the app answers 503 starting
            raise RuntimeError("the replica is starting")
        wait_s = self.settings.request_timeout_s
        held = await service.registry.hold_async(task, wait_s)  # no thread held meanwhile
        if not held:
            raise LookupError(f"task {task!r} is not held here")  # not cached by Ray
        return task

    async def check_health(self) -> None:
        """Ray restarts a replica whose start-up failed or whose batcher died."""
        startup = self.fleet_app.state.startup
        if startup.error is not None:
            raise RuntimeError(f"start-up failed: {startup.error}")

    def __del__(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
