"""Resumable bulk indexing: which of a batch's ids a version already holds.

A bulk run killed halfway is run again with the same ids; asking the store first (one
`retrieve` per batch, by the ids' deterministic point uuids) skips what is stored under the
same prompt version, so nothing is embedded or written twice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from server.store.contract import (
    ID_KEY,
    ConflictError,
    InvalidInputError,
    MissingCollectionError,
    StoreError,
    UnknownTaskError,
    check_ids,
    point_id,
)

log = logging.getLogger("lpi.store")


class ExistingIds:
    """Mixed into `Store`, whose `_require_entry` and `_backend` it uses."""

    def existing_ids(self, task: str, version: str, ids: Sequence[str]) -> set[str]:
        """The ids of `ids` already stored under this version of the task."""
        entry = self._require_entry(task, version)  # type: ignore[attr-defined]
        ids = check_ids(ids, len(ids))
        points = [point_id(task, version, id) for id in ids]
        try:
            found = self._backend.retrieve(entry["collection"], points)  # type: ignore[attr-defined]
        except MissingCollectionError as error:
            raise UnknownTaskError(f"task {task!r} was deleted from the store", "task") from error
        return {payload[ID_KEY] for payload in found} & set(ids)


# -- what /index and /search ask of the store beyond the interface ------------------------------


def check_given_vectors(request, dim: int) -> dict[int, list[float]]:
    """Item position -> its precomputed vector [D], checked (finite, non-zero, of size D),
    each error naming `items[i].vector`; they need the request's `prompt_version`."""
    given = {i: item.vector for i, item in enumerate(request.items) if item.vector is not None}
    if given and request.prompt_version is None:
        raise InvalidInputError(
            "prompt_version: items with a vector need the prompt version that computed them",
            "prompt_version",
        )
    for i, vector in given.items():
        field = f"items[{i}].vector"
        if len(vector) != dim:
            raise InvalidInputError(f"{field}: {len(vector)} values, not {dim}", field)
        peak = max(abs(v) for v in vector)
        if not math.isfinite(peak) or any(not math.isfinite(v) for v in vector) or peak == 0:
            raise InvalidInputError(f"{field}: not a finite vector of non-zero norm", field)
    return given


def check_given_version(request, version: str, given: dict) -> None:
    """Precomputed vectors are stored only under the version that made them: the newest."""
    if given and request.prompt_version != version:
        raise ConflictError(
            f"prompt_version: the vectors were made by {request.prompt_version!r}, but task "
            f"{request.task!r} now indexes with {version!r}: recompute them",
            "prompt_version",
        )


def filter_warnings(store, task: str, version: str, filter: Mapping[str, Any]) -> list[str]:
    """A warning per filtered field with no payload index on a collection big enough that a
    scan is slow; asks the store to build the index (in the background where it can)."""
    unindexed = getattr(store, "unindexed_filter", None)
    if unindexed is None:
        return []
    try:
        missing = unindexed(task, version, filter)
    except StoreError:
        return []  # the search itself answered; its errors are its own
    out = []
    for field, kind in missing.items():
        log.warning(
            "filter on a field with no payload index",
            extra={"task": task, "field": field, "index": kind},
        )
        out.append(
            f"filter.{field}: no payload index on {field!r}, so this search scanned every "
            f"point; a {kind} index is being built"
        )
        store.request_index(task, version, field, kind)
    return out
