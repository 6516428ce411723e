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

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

# Task names as `export.task_id` makes them (also the store's rule); "auto" routes by task keys.
TASK_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,127}$"
_TASK_RE = re.compile(TASK_PATTERN)
AUTO = "auto"
MAX_TOP_K = 1000
MAX_ID_LENGTH = 128

TaskName = Annotated[str, StringConstraints(pattern=TASK_PATTERN)]
PointId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]
Base64Image = Annotated[str, StringConstraints(min_length=1)]
PayloadValue = str | int | float | bool | None
# Filters are exact matches on payload keys (the store's rule: strings, integers, booleans).
FilterValue = str | int | bool


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
        None, description="A loaded task, 'auto' to route each item by the task keys, or null "
        "for the bare backbone."
    )  # fmt: skip
    texts: list[str] = Field(default_factory=list)
    images: list[Base64Image] = Field(default_factory=list, description="base64-encoded files")

    @model_validator(mode="after")
    def _something_to_embed(self) -> EmbedRequest:
        if not self.texts and not self.images:
            raise ValueError("texts: give at least one of texts or images")
        return self


class EmbedResponse(Reply):
    task: str | None = Field(description="The task asked for ('auto' when routed).")
    prompt_version: str | None = Field(
        description="The prompt version that computed every vector (null for the bare "
        "backbone or when rows were routed to several tasks; see prompt_versions)."
    )  # fmt: skip
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
    payload: dict[str, PayloadValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_content(self) -> IndexItem:
        if (self.text is None) == (self.image is None):
            raise ValueError("text: give exactly one of text or image")
        return self


class IndexRequest(Model):
    task: TaskName
    items: list[IndexItem] = Field(min_length=1)


class IndexResponse(Reply):
    task: str
    prompt_version: str
    ids: list[str]
    serving: bool = Field(
        description="False while this prompt version is loaded but not yet promoted: the items "
        "are stored under it and become searchable when it is promoted."
    )  # fmt: skip


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
    filter: dict[str, FilterValue] | None = Field(
        None, description="Exact matches on payload keys."
    )
    accept_mismatch: bool = Field(
        False,
        description="Embed the query with the newest loaded prompt version and search the "
        "serving version's vectors even when they differ (scores are then not comparable).",
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


class TaskList(Reply):
    tasks: list[TaskInfo]


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


class UnloadResponse(Reply):
    task: str
    unloaded_versions: list[str]
    vectors_deleted: bool


# -- health -------------------------------------------------------------------------------------


class Health(Reply):
    status: Literal["ok"] = "ok"


class Readiness(Reply):
    ready: bool
    backbone: str
    engine: str
    tasks: int
    queue_rows: int
    reasons: list[str] = Field(default_factory=list, description="Why not ready, if not.")
