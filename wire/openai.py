"""The OpenAI-compatible embeddings API on the wire (`POST /v1/embeddings`, `GET /v1/models`).

OpenAI's shapes, so its SDKs and every tool built on them (and Infinity / TEI clients) work
unchanged: `model` names a loaded task (or `BARE_MODEL`, the backbone without prompts),
`input` a text or a list of texts. Images travel through `images`, an extension field (base64
or data URIs; OpenAI clients send it with `extra_body`). Token arrays are refused: the CLIP
tokenizer runs on the server. Pydantic only, like `wire.schema`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

BARE_MODEL = "lpi:backbone"  # ':' is in no task name, so no task can take this id


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description=f"A loaded task, 'auto', or {BARE_MODEL!r} (no prompt).")
    input: str | list[Any] | None = Field(
        None, description="A text or a list of texts (token arrays are not supported)."
    )
    images: list[str] = Field(
        default_factory=list,
        description="Extension: images as base64 or data URIs (data:image/png;base64,...); "
        "their embeddings follow the texts', in order.",
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each embedding as little-endian float32 bytes."
    )
    dimensions: int | None = Field(
        None, description="Must equal the model's embedding size if given (no truncation)."
    )
    user: str | None = Field(None, description="Accepted and ignored (OpenAI's end-user id).")

    @field_validator("input")
    @classmethod
    def _texts(cls, value: Any) -> Any:
        items = [value] if isinstance(value, str) else value
        for i, item in enumerate(items or []):
            if not isinstance(item, str):
                raise PydanticCustomError(
                    "token_array",
                    "token arrays are not supported: send the text (the server tokenizes it)"
                    if isinstance(item, int | list)
                    else f"input[{i}] is not a string",
                )
        return value

    @model_validator(mode="after")
    def _something(self) -> EmbeddingsRequest:
        if not self.texts and not self.images:
            raise PydanticCustomError(
                "empty_input",
                "input is empty: give a non-empty text, a list of texts, or images",
                {"field": "input"},
            )
        if any(text == "" for text in self.texts):
            raise PydanticCustomError(
                "empty_input", "input holds an empty string", {"field": "input"}
            )
        return self

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input or [])


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int = Field(description="CLIP tokens of the texts (images count none).")
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the task's serving version was loaded.")
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, ...")
    param: str | None = Field(None, description="The request field at fault.")
    code: str | None = Field(None, description="lpi-serve's error kind, e.g. model_not_found.")


class ErrorBody(BaseModel):
    error: ErrorDetail
