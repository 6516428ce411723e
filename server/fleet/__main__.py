"""`python -m server.fleet`: the server as a Ray Serve application (--help lists every flag).

Starts a local Ray cluster (or joins one with --address), creates the task catalog actor and,
for an embedded store, the store actor, deploys the engine replicas and serves the HTTP API
through Ray Serve's proxy on --host/--port until SIGINT or SIGTERM; then it shuts the
application down, and the local cluster with it. A problem an operator can fix (a setting,
the ray extra missing, a cluster that cannot be reached) is one line on stderr, exit status 2.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading

from server import logs
from server.preflight import PreflightError

USAGE_ERROR = 2
PROBE_TIMEOUT_S = 5.0
log = logging.getLogger("server.fleet")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logs.configure(None)
    try:
        settings = _parse(argv)
        _check_ray()
    except PreflightError as err:
        logs.fatal(str(err), None)
        return USAGE_ERROR
    logs.configure(settings.log_format, settings.log_level)
    try:
        return _run(settings)
    except PreflightError as err:
        logs.fatal(str(err), settings.log_format)
        return USAGE_ERROR


def _parse(argv: list[str]):
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from server.fleet.settings import parse_fleet_settings
    from server.settings import error_line

    try:
        return parse_fleet_settings(argv)
    except (SettingsError, ValidationError) as err:
        raise PreflightError(error_line(err)) from None


def _check_ray() -> None:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise PreflightError("the fleet needs Ray Serve: pip install 'lpi-serve[fleet]'") from None


def _run(settings) -> int:
    import ray

    from server.preflight import check_backbone, check_extras

    check_extras(settings)
    check_backbone(settings)
    temp_dir = _connect(settings)
    try:
        actors = _deploy(settings, temp_dir)  # held: an actor lives while its creator holds it
        _wait_for_signal()
        del actors
        return 0
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        if temp_dir is not None:  # the local cluster's logs and sockets: ours alone
            shutil.rmtree(temp_dir, ignore_errors=True)


def _connect(settings) -> str | None:
    """Join --address, or start a local cluster sized for the replicas (logical CPUs); the
    local cluster's folder (None when joining)."""
    import ray

    from server.fleet.deployment import NAMESPACE

    options = dict(namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    if settings.address is not None:
        _probe(settings.address)  # Ray itself retries an unreachable address for minutes
    temp_dir = None
    if settings.address is None:
        temp_dir = tempfile.mkdtemp(prefix="lpi-ray-")
        replicas = settings.max_replicas or settings.replicas
        options |= dict(
            num_cpus=math.ceil(replicas * settings.replica_cpus) + 1,
            object_store_memory=256 * 1024 * 1024,
            _temp_dir=temp_dir,  # this cluster's own, not the shared /tmp/ray
        )
    try:
        ray.init(address=settings.address, **options)
    except Exception as err:  # ConnectionError, or Ray's own for a bad address
        where = settings.address or "a local Ray cluster"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PreflightError(f"cannot reach {where}: {first}") from None
    return temp_dir


def _probe(address: str) -> None:
    """One TCP connection to `address` (host:port, or ray://host:port for Ray Client; 'auto'
    is Ray's to find), so a cluster that cannot be reached fails the start at once."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise PreflightError(f"--address {address!r}: give host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise PreflightError(f"cannot reach the Ray cluster at {address}: {reason}") from None


def _deploy(settings, scratch_root: str | None) -> list:
    import ray
    from ray import serve

    from server.fleet.catalog import CatalogActor
    from server.fleet.deployment import (
        APP_NAME,
        CATALOG_ACTOR,
        NAMESPACE,
        STORE_ACTOR,
        EngineReplica,
        embedded,
    )
    from server.fleet.store_actor import StoreActor

    shared = settings.shared_dir
    shared.mkdir(parents=True, exist_ok=True)
    restart = dict(namespace=NAMESPACE, max_restarts=-1, max_task_retries=-1, num_cpus=0)
    catalog = ray.remote(CatalogActor).options(name=CATALOG_ACTOR, **restart)
    handles = [catalog.remote(str(shared / "artifacts"))]
    if embedded(settings):
        store_settings = settings.replica_settings().model_copy(update={"data_dir": shared})
        store = ray.remote(StoreActor).options(name=STORE_ACTOR, max_concurrency=16, **restart)
        handles.append(store.remote(store_settings))
    ray.get([handle.__ray_ready__.remote() for handle in handles])
    serve.start(
        http_options={"host": settings.host, "port": settings.port},
        logging_config=settings.serve_logging(),
    )
    scaling: dict = {"num_replicas": settings.replicas}
    if settings.max_replicas is not None:
        scaling = {
            "autoscaling_config": {
                "min_replicas": settings.min_replicas,
                "max_replicas": settings.max_replicas,
                "target_ongoing_requests": settings.target_requests,
            }
        }
    deployment = EngineReplica.options(
        ray_actor_options={"num_cpus": settings.replica_cpus},
        max_ongoing_requests=settings.max_ongoing_requests,
        **scaling,
    )
    app = deployment.bind(
        settings.replica_settings(),
        str(shared),
        scratch_root,
        settings.working_set,
        settings.artifact_store,
    )
    serve.run(app, name=APP_NAME, route_prefix="/")
    log.info(
        "fleet serving on http://%s:%d: %s replicas, shared folder %s, store %s",
        settings.host,
        settings.port,
        scaling,
        shared,
        settings.store,
        extra={"port": settings.port, "fleet_dir": str(shared)},
    )
    return handles


def _wait_for_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    log.info("stopping the fleet")


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
