"""What the server asks of a vector store, and the checks every implementation shares.

A task's vectors are only comparable with vectors made by the same prompt version (a content
hash of the task's prompt), so every call names both, every stored point records both, and a
search only ever scores the vectors of one version. A task has one *serving* version: the one a
search falls back to when its caller explicitly accepts comparing across versions.

Dimensions: B points in a batch, D the vector size of a task version.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from wire import schema
from wire.payloads import utf8_error

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
    """Base of the store's errors: what went wrong, and `field`, the argument at fault (`dim`,
    `ids[3]`, `payloads[2]`, `version`, ...; None when none is). No HTTP status: the server's
    error map turns the subclass into one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidInputError(StoreError, ValueError):
    """A malformed argument; `field` names it."""


class UnknownTaskError(StoreError, LookupError):
    """No version of this task was ever ensured (or the task was deleted meanwhile)."""


class UnknownVersionError(StoreError, LookupError):
    """The task exists, this prompt version of it does not (after a prompt swap)."""


class ConflictError(StoreError):
    """The request contradicts the stored state: a dimension, the layout, the serving
    version."""


class MissingCollectionError(StoreError):
    """A backend's collection vanished between the catalog read and the call (a concurrent
    delete); the store turns it into UnknownTaskError for the caller."""


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

    def count(self, task: str, version: str, filter: Mapping[str, Any] | None = None) -> int:
        """Points of this version (matching `filter`, exact payload matches, if given)."""

    def list_points(
        self,
        task: str,
        version: str,
        filter: Mapping[str, Any] | None = None,
        limit: int = 100,
        offset: str | None = None,
    ) -> tuple[list[tuple[str, dict]], str | None]:
        """A page of (id, payload) and the offset of the next page (None after the last)."""

    def delete_points(
        self,
        task: str,
        version: str,
        ids: Sequence[str] | None = None,
        filter: Mapping[str, Any] | None = None,
    ) -> int:
        """Delete by ids or by filter (exactly one); returns how many existed."""

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
        raise InvalidInputError(f"task: {task!r} is not a task id ({schema.TASK_PATTERN})", "task")
    return task


def check_version(version: Any) -> str:
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise InvalidInputError(
            f"version: {version!r} is not a prompt version ({VERSION_RE.pattern})", "version"
        )
    return version


def check_prefix(prefix: Any) -> str:
    if not isinstance(prefix, str) or not PREFIX_RE.fullmatch(prefix):
        raise InvalidInputError(f"prefix: {prefix!r} does not match {PREFIX_RE.pattern}", "prefix")
    return prefix


def check_layout(layout: Any) -> Layout:
    if layout not in LAYOUTS:
        raise InvalidInputError(f"layout: {layout!r} is not one of {LAYOUTS}", "layout")
    return layout


def check_dim(dim: Any) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or not 1 <= dim <= MAX_DIM:
        raise InvalidInputError(f"dim: {dim!r} is not an integer in [1, {MAX_DIM}]", "dim")
    return int(dim)


def check_top_k(top_k: Any) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 1:
        raise InvalidInputError(f"top_k: {top_k!r} is not an integer >= 1", "top_k")
    return int(top_k)


def check_offset(offset: Any) -> str:
    """A page offset as `list_points` returned it: a point's uuid."""
    try:
        return str(uuid.UUID(str(offset)))
    except ValueError:
        raise InvalidInputError(
            f"offset: {str(offset)[:64]!r} is not an offset a listing returned", "offset"
        ) from None


def check_vectors(vectors: Any, dim: int) -> np.ndarray:
    """[B, D] finite rows of non-zero norm -> unit float32 rows (see `_unit_rows`)."""
    array = _as_float(vectors, "vectors")
    if array.ndim >= 1 and array.shape[0] == 0:
        raise InvalidInputError("vectors: empty batch", "vectors")
    if array.ndim != 2 or array.shape[1] != dim:
        raise InvalidInputError(
            f"vectors: expected shape [B, {dim}], got {list(array.shape)}", "vectors"
        )
    return _unit_rows(array, "vectors")


def check_vector(vector: Any, dim: int) -> np.ndarray:
    """[D] finite, of non-zero norm -> a unit float32 vector."""
    array = _as_float(vector, "vector")
    if array.shape != (dim,):
        raise InvalidInputError(
            f"vector: expected shape [{dim}], got {list(array.shape)}", "vector"
        )
    return _unit_rows(array[None], "vector")[0]


def _as_float(value: Any, name: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as error:
        raise InvalidInputError(f"{name}: not a numeric array ({error})", name) from None


def _unit_rows(rows: np.ndarray, name: str) -> np.ndarray:
    """Rows [B, D] (float64) scaled to unit norm, then float32 (what Qdrant stores).

    Cosine ignores scale, but the backends normalise in float32, where a component of 1e30
    squares to infinity (Qdrant Edge then scores every point 0) and one of 1e-30 to zero. Here
    each row is first divided by its largest component, so no square overflows or underflows.
    """
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        raise InvalidInputError(f"{name}: row {int(np.argmin(finite))} is not finite", name)
    peak = np.abs(rows).max(axis=1)  # [B]
    if (peak == 0).any():
        raise InvalidInputError(f"{name}: row {int(np.argmax(peak == 0))} has norm 0", name)
    scaled = rows / peak[:, None]  # [B, D], largest component +-1
    return (scaled / np.linalg.norm(scaled, axis=1, keepdims=True)).astype(np.float32)


def check_ids(ids: Sequence[str] | None, batch: int) -> list[str]:
    if ids is None:
        return [str(uuid.uuid4()) for _ in range(batch)]
    if isinstance(ids, str) or not isinstance(ids, Sequence):
        raise InvalidInputError(
            f"ids: expected a sequence of strings, got {type(ids).__name__}", "ids"
        )
    ids = list(ids)
    if len(ids) != batch:
        raise InvalidInputError(f"ids: {len(ids)} ids for {batch} vectors", "ids")
    for i, id in enumerate(ids):
        if not isinstance(id, str) or not id:
            raise InvalidInputError(f"ids[{i}]: {id!r} is not a non-empty string", f"ids[{i}]")
        why = utf8_error(id)
        if why:
            raise InvalidInputError(f"ids[{i}]: the id {why}", f"ids[{i}]")
    duplicates = [id for id, n in Counter(ids).items() if n > 1]
    if duplicates:
        raise InvalidInputError(
            f"ids: {duplicates[0]!r} appears more than once in one batch", "ids"
        )
    return ids
