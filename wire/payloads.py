"""What a point's payload and a search's filter may hold on the wire: what every store keeps
exactly and every response can carry.

A lone surrogate (which a JSON `\\uXXXX` escape can carry but UTF-8 cannot encode) once
answered 200 at /index and then broke every search that met the point; an integer past int64
came back from Qdrant Edge as a float. So values are checked one by one, their types kept
exactly (a PlainValidator: no int -> float, no str -> number), and each error names the key
(`items[0].payload.k`); keys are checked before values, so no error names a key that no
response could carry. Pydantic only, like `wire.schema`, which re-exports the value types.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, PlainValidator

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # Qdrant's payload integers
MAX_PAYLOAD_KEYS = 256
MAX_KEY_LENGTH = 256  # characters
MAX_PAYLOAD_BYTES = 65_536  # one item's payload as UTF-8 JSON
MAX_FILTER_KEYS = 64
# A filter names a payload key literally (the store quotes it); a quote or backslash cannot be
# quoted, so no payload key may hold one: every stored key stays filterable.
UNQUOTABLE = ('"', "\\")

PayloadValue = str | int | float | bool | None
# Filters are exact matches on payload keys (the store's rule: strings, integers, booleans).
FilterValue = str | int | bool


def utf8_error(text: str) -> str | None:
    """Why `text` cannot be stored (a lone surrogate, which JSON's \\uXXXX escapes can carry
    but UTF-8 cannot), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"holds {text[error.start]!a} at {error.start}, which UTF-8 cannot encode"
    return None


def _encodable(text: str) -> str:
    why = utf8_error(text)
    if why:
        raise ValueError(f"the string {why}")
    return text


def _int64(value: int) -> int:
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"the integer {value} is outside int64 [{INT64_MIN}, {INT64_MAX}]")
    return int(value)


def _payload_value(value: Any) -> PayloadValue:
    """One payload value, its type kept exactly (no int -> float, no str -> number)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return _int64(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"the number {value} is not finite (JSON has no NaN or Infinity)")
        return float(value)
    if isinstance(value, str):
        return _encodable(value)
    raise ValueError(
        f"a payload value is a string, integer, number, boolean or null, not "
        f"{type(value).__name__} (nested lists and objects are not stored)"
    )


def _filter_value(value: Any) -> FilterValue:
    """An exact-match value: a string, an int64 or a boolean (1.0 means the integer 1)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return _int64(value)
    if isinstance(value, str):
        return _encodable(value)
    raise ValueError(
        f"a filter value is a string, integer or boolean (exact match), not {type(value).__name__}"
    )


def _keys(limit: int, what: str) -> BeforeValidator:
    """Checks keys before their values, so no error names a key no response could carry."""

    def check(mapping: Any) -> Any:
        if not isinstance(mapping, dict):
            return mapping  # the dict type refuses it, naming the field
        if len(mapping) > limit:
            raise ValueError(f"{len(mapping)} keys; a {what} has at most {limit}")
        for key in mapping:
            if not isinstance(key, str):
                raise ValueError(f"the key {key!a} is not a string")
            why = utf8_error(key) if key else "is empty, which no filter could name"
            if why is None and len(key) > MAX_KEY_LENGTH:
                why = f"has {len(key)} characters; the limit is {MAX_KEY_LENGTH}"
            if why is None and any(c in key for c in UNQUOTABLE):
                why = "holds a quote or backslash, which no filter could name"
            if why is not None:
                raise ValueError(f"the key {key[:64]!a} {why}")
        return mapping

    return BeforeValidator(check)


def _payload_size(payload: dict[str, PayloadValue]) -> dict[str, PayloadValue]:
    size = len(json.dumps(payload, ensure_ascii=False).encode())
    if size > MAX_PAYLOAD_BYTES:
        raise ValueError(f"{size} bytes as JSON; a payload has at most {MAX_PAYLOAD_BYTES}")
    return payload


JSON_INT64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
Payload = Annotated[
    dict[
        str,
        Annotated[
            PayloadValue,
            PlainValidator(
                _payload_value, json_schema_input_type=str | JSON_INT64 | float | bool | None
            ),
        ],
    ],
    _keys(MAX_PAYLOAD_KEYS, "payload"),
    AfterValidator(_payload_size),
    Field(json_schema_extra={"maxProperties": MAX_PAYLOAD_KEYS}),
]
Filter = Annotated[
    dict[
        str,
        Annotated[
            FilterValue,
            PlainValidator(_filter_value, json_schema_input_type=str | JSON_INT64 | bool),
        ],
    ],
    _keys(MAX_FILTER_KEYS, "filter"),
    Field(json_schema_extra={"maxProperties": MAX_FILTER_KEYS}),
]
