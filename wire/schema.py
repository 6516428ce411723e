"""Every type on the wire, in one module that imports only pydantic.

The server validates requests with these models and the Python SDK (`clients`) parses
responses with them, so the two can never disagree. Size limits that depend on the server's
settings (items per request, text length, pixels) are checked by the server, which answers 4xx
naming the field; the bounds here are the ones no deployment would change.

Images travel as base64 strings in JSON (standard or URL-safe alphabet, padding optional) or as
files in a multipart form. Vectors are unit-norm float lists; scores are cosine similarities.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)
from pydantic_core import PydanticCustomError

from wire.payloads import Filter, Payload
from wire.payloads import FilterValue as FilterValue  # re-exported: the SDK's type hints
from wire.payloads import PayloadValue as PayloadValue

# Task names as `export.task_id` makes them (also the store's rule); "auto" routes by task keys.
TASK_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,127}$"
_TASK_RE = re.compile(TASK_PATTERN)
AUTO = "auto"
MAX_TOP_K = 1000
MAX_ID_LENGTH = 128

TaskName = Annotated[str, StringConstraints(pattern=TASK_PATTERN)]
PointId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]
Base64Image = Annotated[str, StringConstraints(min_length=1)]


def is_task_name(value: object) -> bool:
    """The one test of a task name (the whole string, so no trailing newline slips through)."""
    return isinstance(value, str) and _TASK_RE.fullmatch(value) is not None


class Model(BaseModel):
    """Requests: unknown fields are refused, so a misspelt option is an error, not ignored."""

    model_config = ConfigDict(extra="forbid")


class Reply(BaseModel):
    """Responses: unknown fields are ignored, so a newer server's additions break no client."""

    model_config = ConfigDict(extra="ignore")


# -- errors -------------------------------------------------------------------------------------


class ErrorDetail(Reply):
    type: str = Field(description="A stable machine-readable kind, e.g. 'unknown_task'.")
    message: str
    field: str | None = Field(None, description="The request field at fault, dotted, if any.")


class ErrorBody(Reply):
    error: ErrorDetail


# -- embed --------------------------------------------------------------------------------------


class EmbedRequest(Model):
    task: TaskName | None = Field(
        None,
        description="A loaded task, 'auto' to route each item by the task keys, or null "
        "for the bare backbone.",
    )
    texts: list[str] = Field(default_factory=list)
    images: list[Base64Image] = Field(default_factory=list, description="base64-encoded files")

    @model_validator(mode="after")
    def _something_to_embed(self) -> EmbedRequest:
        if not self.texts and not self.images:
            ctx = {"field": "texts"}  # the field to fix: the server's error body names it
            raise PydanticCustomError("empty", "give at least one of texts or images", ctx)
        return self


class EmbedResponse(Reply):
    task: str | None = Field(description="The task asked for ('auto' when routed).")
    prompt_version: str | None = Field(
        description="The prompt version that computed every vector (null for the bare "
        "backbone or when rows were routed to several tasks; see prompt_versions)."
    )
    backbone: str = Field(description="The serving backbone's fingerprint.")
    text_embeddings: list[list[float]] | None = None
    image_embeddings: list[list[float]] | None = None
    text_tasks: list[str | None] | None = Field(None, description="Routed task per text (auto).")
    image_tasks: list[str | None] | None = Field(None, description="Routed task per image.")
    prompt_versions: dict[str, str] = Field(
        default_factory=dict, description="Every task used -> the prompt version that served it."
    )


# -- index and search ---------------------------------------------------------------------------


class IndexItem(Model):
    id: PointId | None = Field(None, description="Your id; a new UUID when absent.")
    text: str | None = None
    image: Base64Image | None = None
    thumbnail: bool | Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="Store a small JPEG of the image in the payload ('thumbnail', a data "
        "URI): true, or its largest side in pixels (up to the server's limit); null: the "
        "request's `thumbnail`.",
    )
    vector: list[float] | None = Field(
        None,
        description="A precomputed vector of the request's `prompt_version` (bulk "
        "indexing: stored as given, normalised, without running the model).",
    )
    payload: Payload = Field(
        default_factory=dict,
        description="Flat JSON stored with the point: strings (UTF-8), int64 integers, finite "
        "numbers, booleans, null; keys without quotes or backslashes.",
    )

    @model_validator(mode="after")
    def _one_content(self) -> IndexItem:
        given = [name for name in ("text", "image", "vector") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("text: give exactly one of text, image or vector")
        return self


class IndexRequest(Model):
    task: TaskName
    items: list[IndexItem] = Field(min_length=1)
    thumbnail: bool | Annotated[int, Field(ge=1)] = Field(
        False, description="Store a thumbnail of every image item (true, or a side in pixels)."
    )
    prompt_version: str | None = Field(
        None,
        max_length=64,
        description="The version that computed the items' `vector`s: "
        "required with them, and it must be the task's newest loaded version (409 otherwise).",
    )
    skip_existing: bool = Field(
        False,
        description="Resume a bulk run: items whose id is already stored under this "
        "prompt version are skipped (neither embedded nor written again).",
    )


class IndexResponse(Reply):
    task: str
    prompt_version: str
    ids: list[str]
    skipped: list[str] = Field(
        default_factory=list, description="Ids already stored (with skip_existing)."
    )
    serving: bool = Field(
        description="False while this prompt version is loaded but not yet promoted: the items "
        "are stored under it and become searchable when it is promoted."
    )


class SearchQuery(Model):
    text: str | None = None
    image: Base64Image | None = None
    vector: list[float] | None = Field(None, description="A unit vector of this task's version.")

    @model_validator(mode="after")
    def _one_query(self) -> SearchQuery:
        given = [name for name in ("text", "image", "vector") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("query: give exactly one of text, image or vector")
        return self


class SearchRequest(Model):
    task: TaskName
    query: SearchQuery
    top_k: int = Field(10, ge=1, le=MAX_TOP_K)
    filter: Filter | None = Field(
        None, description="Exact matches on top-level payload keys, named literally."
    )
    accept_mismatch: bool = Field(
        False,
        description="Embed the query with the newest loaded prompt version and search the "
        "serving version's vectors even when they differ (scores are then not comparable).",
    )
    exact: bool = Field(False, description="Score every stored vector (audits): no HNSW.")
    hnsw_ef: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="HNSW candidate list for this search (higher: better "
        "recall, slower); null: the collection's setting.",
    )


class SearchHit(Reply):
    id: str
    score: float
    payload: dict[str, Any]


class SearchResponse(Reply):
    task: str
    prompt_version: str = Field(description="The prompt version of the query vector.")
    index_version: str = Field(description="The prompt version of the vectors searched.")
    hits: list[SearchHit]
    warnings: list[str] = Field(
        default_factory=list,
        description="E.g. a filter on a field with no payload index at a "
        "size where it scans every point (the index is then built in the background).",
    )


# -- stored points: count, list, delete ----------------------------------------------------------


class PointsRequest(Model):
    """POST /points/count and /points/list: the serving version's points matching `filter`."""

    task: TaskName
    filter: Filter | None = Field(None, description="Exact matches on top-level payload keys.")
    limit: int = Field(100, ge=1, le=MAX_TOP_K, description="/points/list: points per page.")
    offset: str | None = Field(None, max_length=64, description="next_offset of the last page.")


class DeletePointsRequest(Model):
    task: TaskName
    ids: list[PointId] | None = Field(None, min_length=1, max_length=MAX_TOP_K)
    filter: Filter | None = None

    @model_validator(mode="after")
    def _one_selector(self) -> DeletePointsRequest:
        if (self.ids is None) == (self.filter is None):
            raise PydanticCustomError(
                "one_selector", "give exactly one of ids or filter", {"field": "ids"}
            )
        return self


class StoredPoint(Reply):
    id: str
    payload: dict[str, Any]


class PointsResponse(Reply):
    task: str
    prompt_version: str = Field(description="The serving version whose points these are.")
    count: int = Field(description="Points counted, listed on this page, or deleted.")
    points: list[StoredPoint] | None = Field(None, description="/points/list only.")
    next_offset: str | None = Field(None, description="/points/list: null after the last page.")


# -- tasks --------------------------------------------------------------------------------------


class TaskInfo(Reply):
    task: str
    prompt_version: str = Field(description="The newest loaded version: /embed and /index use it.")
    serving_version: str | None = Field(
        description="The version /search compares against (the store's serving version)."
    )
    loaded_versions: list[str]
    source_task: str = Field(description="The task id recorded in the artifact.")
    method: str | None = None
    layers: int
    tokens: int
    ranks: dict[str, int] = Field(description="R' per tower: image, text.")
    has_keys: bool = Field(description="Whether the task can be chosen by task='auto'.")
    loaded_at: float = Field(description="Unix time of the load.")
    vectors: int = Field(description="Vectors stored under the serving version.")
    made_by: list[str] = Field(
        default_factory=list,
        description="What made the serving version's vectors, engine/dtype ('torch/float32', "
        "'onnx/int8'; 'external' for vectors sent with /index); more than one when they were "
        "indexed under several; empty when not recorded.",
    )


class TaskFailure(Reply):
    """A task (version) that could not be restored or loaded at start; the others serve. It
    stays listed until an admin loads (or unloads) the task."""

    task: str
    version: str | None = Field(None, description="The version that failed, if known.")
    status: Literal["failed"] = "failed"
    error: str = Field(
        description="Why: a corrupt or missing artifact, a shape that does not "
        "fit the engine, another backbone..."
    )


class TaskList(Reply):
    tasks: list[TaskInfo]
    failed: list[TaskFailure] = Field(default_factory=list, description="Start-up failures.")


class LoadTaskRequest(Model):
    path: str = Field(
        description="An artifact file, relative to the server's artifact directory (no '..')."
    )
    promote: bool = Field(
        False,
        description="Also make this version the one /search uses now, without re-indexing "
        "(stored vectors of the old version stop being searched).",
    )


class LoadTaskResponse(Reply):
    task: TaskInfo
    previous_version: str | None
    changed: bool = Field(description="False when this exact version was already loaded.")


class PromoteRequest(Model):
    version: str = Field(min_length=1, max_length=64)
    force: bool = Field(
        False,
        description="Promote even a version with no vectors while the "
        "serving one has some (refused with 409 otherwise).",
    )


class UnloadResponse(Reply):
    task: str
    unloaded_versions: list[str]
    vectors_deleted: bool


# -- health -------------------------------------------------------------------------------------


class Health(Reply):
    status: Literal["ok"] = "ok"


class BackboneSource(Reply):
    """Where the served weights come from: a file, the hub, the demo bundle, or random."""

    kind: Literal["path", "hub", "demo", "random"]
    name: str = Field(description="As configured: a path, a model name, a preset.")
    detail: str = Field("", description="The resolved file, hub repo@commit, or seed.")


class Readiness(Reply):
    ready: bool
    backbone: str
    engine: str
    tasks: int
    queue_rows: int
    reasons: list[str] = Field(default_factory=list, description="Why not ready, if not.")
    dtype: str | None = Field(
        None, description="What the model computes in: float32, bfloat16, float16 or int8."
    )
    dtype_reason: str | None = Field(
        None, description="Why that dtype; a fall-back from the one asked for says so."
    )
    building: str | None = Field(None, description="While starting: what is built or loaded.")
    progress: float | None = Field(None, description="While starting: the fraction done, 0-1.")
    backbone_source: BackboneSource | None = None
    data_dir: str | None = Field(None, description="Where this server keeps its state.")
    failed: list[TaskFailure] = Field(
        default_factory=list, description="Tasks that failed at start (the others serve)."
    )


class ServiceIndex(Reply):
    """GET /: what this server is and where to look next."""

    name: str
    version: str
    backbone_source: BackboneSource | None = None
    links: dict[str, str] = Field(default_factory=dict, description="Name -> path.")
