"""What made a task version's vectors: the engine and the dtype it computed in.

Vectors of one prompt version made in float32, bfloat16, float16 or by ONNX int8 are
comparable (they differ by ~1e-4 in cosine), but not identical, so the store records each
maker, before the vectors are written, so no stored vector has an unrecorded maker. Each maker
is its own catalog point (`kind` "origin", its id derived from task, version and maker): a
write adds one point and rewrites nothing, so two processes recording different makers of one
version cannot overwrite each other (a read-merge-write of one entry would lose one), and the
version's delete (`Store._forget`, one filter on task and version) takes its makers with it.
The catalog is the store's own collection in both backends (qdrant-client and qdrant-edge),
so the record works, and survives restarts, the same way in both. `EXTERNAL` marks vectors a
caller computed and sent (`items[i].vector`): the store cannot know their dtype.
"""

from __future__ import annotations

from server.store.contract import (
    TASK_KEY,
    VERSION_KEY,
    InvalidInputError,
    catalog_id,
    check_task,
    check_version,
)

ORIGIN_KIND = "origin"  # catalog `kind` of a maker's point
MADE_BY_KEY = "made_by"  # its field: the maker's label
EXTERNAL = "external"


def origin(engine_name: str, dtype: str) -> str:
    """The maker's label: `torch/bfloat16`, `onnx/int8`."""
    return f"{engine_name}/{dtype}"


def origin_dtype(label: str) -> str:
    """The dtype part of a maker's label (`external` has none: itself)."""
    return label.rpartition("/")[2]


def origin_id(task: str, version: str, made_by: str) -> str:
    """The catalog point of one maker of one version: the same point however often written."""
    return catalog_id(ORIGIN_KIND, task, version, made_by)


class Origins:
    """Mixed into `Store`, whose backend, catalog and entry reads it uses."""

    def record_origin(self, task: str, version: str, made_by: str) -> None:
        """Note that `made_by` writes vectors of this version (idempotent: one upsert of the
        maker's own point). The entry is checked after the write: were the version deleted
        meanwhile (by another process), either that delete took the point too, or this check
        sees the entry gone and takes the point back, so no maker outlives its version."""
        if not isinstance(made_by, str) or not made_by or len(made_by) > 64:
            raise InvalidInputError(f"made_by: {made_by!r} is not a maker's label", "made_by")
        point = origin_id(check_task(task), check_version(version), made_by)
        record = {"kind": ORIGIN_KIND, TASK_KEY: task, VERSION_KEY: version, MADE_BY_KEY: made_by}
        self._write_catalog(point, record)  # type: ignore[attr-defined]
        try:
            self._require_entry(task, version)  # type: ignore[attr-defined]
        except BaseException:
            self._backend.delete_ids(self._catalog, [point])  # type: ignore[attr-defined]
            raise

    def origins(self, task: str, version: str) -> list[str]:
        """The makers of this version's vectors, sorted; empty when none was recorded (no
        vectors yet, or vectors written before makers were recorded)."""
        check_task(task)
        check_version(version)
        must = {"kind": ORIGIN_KIND, TASK_KEY: task, VERSION_KEY: version}
        points = self._backend.scroll(self._catalog, must)  # type: ignore[attr-defined]
        made = sorted({point[MADE_BY_KEY] for point in points})
        if not made:
            self._require_entry(task, version)  # type: ignore[attr-defined]  # unknown: an error
        return made
