"""The embedded vector store of a one-machine fleet, owned by one Ray actor.

Qdrant's local mode (and Qdrant Edge) lets one process open its folder; a fleet on one machine
therefore opens it in `StoreActor` and every replica calls it through `RemoteStore`, which has
the `VectorStore` methods. The actor writes through to disk before it answers, so a write a
replica acknowledged survives the actor's death; Ray restarts the actor and `RemoteStore`
retries calls while it comes back. A fleet with a Qdrant URL needs none of this: each replica
opens the server itself.

Store errors cross the process boundary as (class, message, field) and are raised again as
themselves, so the error map gives the same status and field as in one process.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from server.store import contract

log = logging.getLogger("server.fleet.store")

# The store methods a replica may call; anything else is not there (AttributeError), which
# callers probing with getattr (`server.origins`, payload indexes) take as "not supported".
METHODS = frozenset(
    {
        "ensure_task",
        "upsert",
        "search",
        "serving_version",
        "versions",
        "promote",
        "count",
        "list_points",
        "delete_points",
        "delete_version",
        "delete_task",
        "existing_ids",
        "record_origin",  # provenance: what made a version's vectors (made_by)
        "origins",
        "ensure_declared",  # payload indexes declared in the settings, made at first write
        "unindexed_filter",
        "request_index",
    }
)
RETRY_FOR_S = 60.0  # how long a call waits for a restarting store actor
RETRY_PAUSE_S = 0.2


class StoreActor:
    """Holds the one embedded store of the fleet; `call` runs one of its methods."""

    def __init__(self, settings) -> None:
        from server.app import open_store

        self.store = open_store(settings)
        log.info("store actor opened %s in %s", settings.store, settings.data_dir)

    def call(self, method: str, args: tuple, kwargs: dict) -> tuple[str, Any]:
        if method not in METHODS:
            return ("error", (contract.StoreError, f"store method {method!r} refused", None))
        try:
            return ("ok", getattr(self.store, method)(*args, **kwargs))
        except contract.StoreError as err:
            return ("error", (type(err), str(err), err.field))

    def stored_many(self, pairs: list[tuple[str, str | None]]) -> list[dict]:
        """What the store says of many (task, version) pairs in one call (GET /tasks over
        thousands of tasks): {vectors, made_by} each; 0 and [] for a version not given or not
        stored, as `TaskRegistry` reads them."""
        out = []
        for task, version in pairs:
            stored = {"vectors": 0, "made_by": []}
            if version is not None:
                with contextlib.suppress(contract.StoreError):
                    stored["vectors"] = self.store.count(task, version)
                    stored["made_by"] = self.store.origins(task, version)
            out.append(stored)
        return out

    def ready(self) -> bool:
        return True


class RemoteStore:
    """A `VectorStore` whose every call runs in the store actor (retried while it restarts)."""

    def __init__(self, actor) -> None:
        self.actor = actor

    def _call(self, method: str, *args, **kwargs):
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        deadline = time.monotonic() + RETRY_FOR_S
        while True:
            try:
                status, value = ray.get(self.actor.call.remote(method, args, kwargs))
                break
            except (RayActorError, ActorDiedError, ActorUnavailableError) as err:
                if time.monotonic() > deadline:
                    raise contract.StoreError(f"the store actor is unavailable: {err}") from None
                time.sleep(RETRY_PAUSE_S)
        if status == "error":
            cls, message, field = value
            raise cls(message, field)
        return value

    def stored_many(self, pairs: list[tuple[str, str | None]]) -> list[dict]:
        import ray
        from ray.exceptions import RayError

        try:
            return ray.get(self.actor.stored_many.remote(pairs))
        except RayError as err:  # restarting: GET /tasks answers 503, the client retries
            raise contract.StoreError(f"the store actor is unavailable: {err}") from None

    def close(self) -> None:
        """The actor's store outlives every replica: closing a replica closes nothing."""

    def __getattr__(self, method: str):
        if method not in METHODS:
            raise AttributeError(method)
        return lambda *args, **kwargs: self._call(method, *args, **kwargs)
