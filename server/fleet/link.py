"""How a replica talks to the catalog: one small interface, over a Ray actor or in-process.

`ActorLink` calls the `CatalogActor` (retrying while Ray restarts it); `BookLink` holds a
`CatalogBook` in this process (tests and a one-process check of the fleet's logic). Both turn
a refused entry into `CatalogError` naming its field.
"""

from __future__ import annotations

import threading
import time

from server.fleet.catalog import CatalogBook, CatalogError
from server.store import StoreError

RETRY_FOR_S = 30.0  # how long a call waits for a restarting catalog actor
RETRY_PAUSE_S = 0.2


class BookLink:
    """The catalog in this process (thread-safe)."""

    def __init__(self, book: CatalogBook) -> None:
        self.book = book
        self._changed = threading.Condition()

    def publish(self, task, active, serving, versions, info=None) -> int:
        with self._changed:
            generation = self.book.publish(task, active, serving, versions, info)
            self._changed.notify_all()
            return generation

    def remove(self, task: str) -> int:
        with self._changed:
            generation = self.book.remove(task)
            self._changed.notify_all()
            return generation

    def snapshot(self) -> tuple[int, dict[str, dict]]:
        with self._changed:
            return self.book.generation, self.book.live()

    def changes(self, since: int, timeout_s: float) -> tuple[int, dict[str, dict]]:
        with self._changed:
            self._changed.wait_for(lambda: self.book.generation > since, timeout_s)
            return self.book.generation, self.book.changes(since)


class ActorLink:
    """The catalog in its Ray actor; calls wait out a restart of the actor (bounded)."""

    def __init__(self, actor) -> None:
        self.actor = actor

    def publish(self, task, active, serving, versions, info=None) -> int:
        answer = self._call("publish", task, active, serving, versions, info)
        if isinstance(answer, tuple) and answer and answer[0] == "error":
            raise CatalogError(answer[2], answer[1])
        return answer

    def remove(self, task: str) -> int:
        return self._call("remove", task)

    def snapshot(self) -> tuple[int, dict[str, dict]]:
        return self._call("snapshot")

    def changes(self, since: int, timeout_s: float) -> tuple[int, dict[str, dict]]:
        return self._call("changes", since, timeout_s)

    def _call(self, method: str, *args):
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        deadline = time.monotonic() + RETRY_FOR_S
        while True:
            try:
                return ray.get(getattr(self.actor, method).remote(*args))
            except (RayActorError, ActorDiedError, ActorUnavailableError) as err:
                if time.monotonic() > deadline:
                    why = f"the task catalog is unavailable: {err}"
                    raise CatalogUnavailableError(why) from None
                time.sleep(RETRY_PAUSE_S)


class CatalogUnavailableError(StoreError):
    """The catalog's actor did not answer within RETRY_FOR_S (a 503, like a store outage)."""
