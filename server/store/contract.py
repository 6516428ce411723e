"""What the server asks of a vector store, and the checks every implementation shares.

A task's vectors are only comparable with vectors made by the same prompt version (a content
hash of the task's prompt), so every call names both, every stored point records both, and a
search only ever scores the vectors of one version. A task has one *serving* version: the one a
search falls back to when its caller explicitly accepts comparing across versions.

Dimensions: B points in a batch, D the vector size of a task version.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from wire import schema

Layout = Literal["collection-per-task", "tenant"]
LAYOUTS: tuple[Layout, ...] = ("collection-per-task", "tenant")

# Payload keys the store writes on every point; a caller's payload or filter may not use them.
TASK_KEY = "task"
VERSION_KEY = "prompt_version"
ID_KEY = "id"
RESERVED_KEYS = frozenset({TASK_KEY, VERSION_KEY, ID_KEY})

# Task names as `export.task_id` makes them; versions as content hashes, or any short token.
# Neither may hold "@", which separates them in collection names (see `collection_name`).
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
PREFIX_RE = re.compile(r"[a-z][a-z0-9-]{0,15}")
MAX_DIM = 65536  # Qdrant's limit on a dense vector's size

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/lpi-serve/store")


class StoreError(Exception):
    """Base of the store's errors; the subclass says which HTTP status the server should map."""


class InvalidInputError(StoreError, ValueError):
    """A malformed argument (422); the message names it."""


class UnknownTaskError(StoreError, LookupError):
    """No version of this task was ever ensured (404)."""


class UnknownVersionError(StoreError, LookupError):
    """The task exists, this prompt version of it does not (404 or 409 after a prompt swap)."""


class ConflictError(StoreError):
    """The request contradicts the stored state (409): a dimension, the layout, the serving
    version."""


@dataclass(frozen=True)
class Hit:
    """One search result: the caller's id and payload, and the version of the stored vector."""

    id: str
    score: float  # cosine similarity
    payload: dict[str, Any]
    version: str


@runtime_checkable
class VectorStore(Protocol):
    """The storage the server needs. All vectors are compared by cosine similarity."""

    layout: Layout

    def ensure_task(self, task: str, dim: int, version: str) -> None:
        """Make room for `version` of `task` (idempotent); the first version becomes serving."""

    def upsert(
        self,
        task: str,
        version: str,
        ids: Sequence[str] | None,
        vectors: Any,
        payloads: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[str]:
        """Insert or replace B points [B, D]; returns their ids (new uuid4 strings if None)."""

    def search(
        self,
        task: str,
        version: str,
        vector: Any,
        top_k: int = 10,
        filter: Mapping[str, Any] | None = None,
        *,
        accept_mismatch: bool = False,
    ) -> list[Hit]:
        """The top_k stored vectors of this version nearest to `vector` [D], best first.

        `filter` is an exact match on payload keys. If the version was never ensured, this
        raises UnknownVersionError, unless `accept_mismatch`: then the serving version's
        vectors are searched and each hit names that version.
        """

    def serving_version(self, task: str) -> str: ...

    def versions(self, task: str) -> list[str]: ...

    def promote(self, task: str, version: str) -> None:
        """Atomically make `version` the task's serving version."""

    def count(self, task: str, version: str) -> int: ...

    def delete_version(self, task: str, version: str) -> None:
        """Drop one version's vectors; the serving version cannot be dropped this way."""

    def delete_task(self, task: str, keep_vectors: bool = False) -> None:
        """Forget the task. With keep_vectors its vectors stay where they are, and ensuring the
        same version again brings them back."""

    def close(self) -> None: ...


# -- names and ids ---------------------------------------------------------------------------


def alias_name(prefix: str, task: str) -> str:
    """The alias naming a task's serving collection, e.g. `lpi_coco`."""
    return f"{prefix}_{task}"


def collection_name(prefix: str, task: str, version: str) -> str:
    """One version's collection, e.g. `lpi_coco@3f2a...`.

    "@" is in neither a task nor a version, so no version collection of one task can take the
    name of another task's alias (with "_", `lpi_a_b` could be task `a_b`'s alias or version
    `b` of task `a`).
    """
    return f"{prefix}_{task}@{version}"


def tenant_collection_name(prefix: str, dim: int) -> str:
    """The shared collection of every task version of dimension `dim` in the tenant layout."""
    return f"{prefix}@tenants-d{dim}"


def catalog_name(prefix: str) -> str:
    """The store's own bookkeeping collection: which task versions exist, their dimension."""
    return f"{prefix}@catalog"


def point_id(task: str, version: str, id: str) -> str:
    """A deterministic UUID for a caller's id: the same id in another version is another point
    (versions share a collection in the tenant layout)."""
    return str(uuid.uuid5(_NAMESPACE, f"{task}\x00{version}\x00{id}"))


def catalog_id(*parts: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, "\x00".join(("catalog", *parts))))


# -- checks ----------------------------------------------------------------------------------


def check_task(task: Any) -> str:
    if not schema.is_task_name(task):
        raise InvalidInputError(f"task: {task!r} is not a task id ({schema.TASK_PATTERN})")
    return task


def check_version(version: Any) -> str:
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise InvalidInputError(
            f"version: {version!r} is not a prompt version ({VERSION_RE.pattern})"
        )
    return version


def check_prefix(prefix: Any) -> str:
    if not isinstance(prefix, str) or not PREFIX_RE.fullmatch(prefix):
        raise InvalidInputError(f"prefix: {prefix!r} does not match {PREFIX_RE.pattern}")
    return prefix


def check_layout(layout: Any) -> Layout:
    if layout not in LAYOUTS:
        raise InvalidInputError(f"layout: {layout!r} is not one of {LAYOUTS}")
    return layout


def check_dim(dim: Any) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or not 1 <= dim <= MAX_DIM:
        raise InvalidInputError(f"dim: {dim!r} is not an integer in [1, {MAX_DIM}]")
    return int(dim)


def check_top_k(top_k: Any) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 1:
        raise InvalidInputError(f"top_k: {top_k!r} is not an integer >= 1")
    return int(top_k)


def check_vectors(vectors: Any, dim: int) -> np.ndarray:
    """[B, D] finite float32 rows of non-zero norm (cosine normalises them)."""
    array = _as_float(vectors, "vectors")
    if array.ndim >= 1 and array.shape[0] == 0:
        raise InvalidInputError("vectors: empty batch")
    if array.ndim != 2 or array.shape[1] != dim:
        raise InvalidInputError(f"vectors: expected shape [B, {dim}], got {list(array.shape)}")
    return _check_rows(_float32(array), "vectors")


def check_vector(vector: Any, dim: int) -> np.ndarray:
    """[D] finite float32 of non-zero norm."""
    array = _as_float(vector, "vector")
    if array.shape != (dim,):
        raise InvalidInputError(f"vector: expected shape [{dim}], got {list(array.shape)}")
    return _check_rows(_float32(array)[None], "vector")[0]


def _as_float(value: Any, name: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise InvalidInputError(f"{name}: not a numeric array ({error})") from None


def _float32(array: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # what Qdrant stores; an overflow becomes inf, refused next
        return array.astype(np.float32)


def _check_rows(rows: np.ndarray, name: str) -> np.ndarray:
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        raise InvalidInputError(f"{name}: row {int(np.argmin(finite))} is not finite")
    zero = np.linalg.norm(rows, axis=1) == 0
    if zero.any():
        raise InvalidInputError(f"{name}: row {int(np.argmax(zero))} has norm 0")
    return rows


def check_ids(ids: Sequence[str] | None, batch: int) -> list[str]:
    if ids is None:
        return [str(uuid.uuid4()) for _ in range(batch)]
    if isinstance(ids, str) or not isinstance(ids, Sequence):
        raise InvalidInputError(f"ids: expected a sequence of strings, got {type(ids).__name__}")
    ids = list(ids)
    if len(ids) != batch:
        raise InvalidInputError(f"ids: {len(ids)} ids for {batch} vectors")
    for i, id in enumerate(ids):
        if not isinstance(id, str) or not id:
            raise InvalidInputError(f"ids[{i}]: {id!r} is not a non-empty string")
    duplicates = [id for id, n in Counter(ids).items() if n > 1]
    if duplicates:
        raise InvalidInputError(f"ids: {duplicates[0]!r} appears more than once in one batch")
    return ids


def check_payloads(payloads: Sequence[Mapping[str, Any]] | None, batch: int) -> list[dict]:
    """JSON-shaped dicts without reserved keys, copied (every backend stores JSON)."""
    if payloads is None:
        return [{} for _ in range(batch)]
    if len(payloads) != batch:
        raise InvalidInputError(f"payloads: {len(payloads)} payloads for {batch} vectors")
    out = []
    for i, payload in enumerate(payloads):
        if not isinstance(payload, Mapping):
            raise InvalidInputError(f"payloads[{i}]: expected a dict, got {type(payload).__name__}")
        reserved = RESERVED_KEYS.intersection(payload)
        if reserved:
            raise InvalidInputError(f"payloads[{i}]: keys {sorted(reserved)} are reserved")
        try:
            out.append(json.loads(json.dumps(dict(payload), allow_nan=False)))
        except (TypeError, ValueError) as error:
            raise InvalidInputError(f"payloads[{i}]: not JSON ({error})") from None
    return out


def check_filter(filter: Mapping[str, Any] | None) -> dict[str, str | int | bool]:
    """Exact-match conditions: payload key -> str, int or bool (what Qdrant matches exactly)."""
    if filter is None:
        return {}
    if not isinstance(filter, Mapping):
        raise InvalidInputError(f"filter: expected a dict, got {type(filter).__name__}")
    for key, value in filter.items():
        if not isinstance(key, str) or not key:
            raise InvalidInputError(f"filter: key {key!r} is not a non-empty string")
        if key in RESERVED_KEYS:
            raise InvalidInputError(f"filter[{key!r}]: reserved; the store sets it")
        if not isinstance(value, str | int | bool):
            raise InvalidInputError(
                f"filter[{key!r}]: {value!r} is not a str, int or bool (exact match only)"
            )
    return dict(filter)


def user_payload(payload: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (payload or {}).items() if k not in RESERVED_KEYS}
