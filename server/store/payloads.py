"""What a point's payload and a search's filter may hold, and what a search hands back.

Every backend stores JSON, but they part ways at its edges: Qdrant Edge turns an integer beyond
int64 into a float and cannot take a string that is not valid UTF-8 (a lone surrogate, which a
JSON `\\uXXXX` escape can carry), while local mode stores both and the response that returns
them then fails to serialise. So the store takes only what every backend keeps exactly
(strings UTF-8 can encode, int64 integers, finite floats, bounded nesting; the wire schema's
rules, which the server checks at the door), and on the way out it escapes what JSON cannot
carry, so a point stored before these rules can never break a search.

Filter keys name top-level payload keys literally: `filter_key` quotes them for Qdrant, whose
paths would otherwise read "a.b" as a nested key and refuse "a b" outright.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from server.store.contract import RESERVED_KEYS, InvalidInputError
from wire import payloads as rules

MAX_DEPTH = 32  # lists and objects nested inside one payload (itself not counted)


def check_payloads(payloads: Sequence[Mapping[str, Any]] | None, batch: int) -> list[dict]:
    """JSON-shaped dicts without reserved keys, copied as plain JSON types."""
    if payloads is None:
        return [{} for _ in range(batch)]
    if isinstance(payloads, Mapping | str) or not isinstance(payloads, Sequence):
        raise InvalidInputError(
            f"payloads: expected a sequence of dicts, got {type(payloads)}", "payloads"
        )
    if len(payloads) != batch:
        raise InvalidInputError(
            f"payloads: {len(payloads)} payloads for {batch} vectors", "payloads"
        )
    return [check_payload(payload, f"payloads[{i}]") for i, payload in enumerate(payloads)]


def check_payload(payload: Any, where: str) -> dict:
    if not isinstance(payload, Mapping):
        raise InvalidInputError(f"{where}: expected a dict, got {type(payload).__name__}", where)
    reserved = RESERVED_KEYS.intersection(payload)
    if reserved:
        raise InvalidInputError(f"{where}: keys {sorted(reserved)} are reserved", where)
    for key in payload:
        if isinstance(key, str) and any(c in key for c in rules.UNQUOTABLE):
            raise InvalidInputError(
                f"{where}: the key {key!r} holds a quote or backslash, which no filter could name",
                where,
            )
    return _json(payload, where, 0)


def _json(value: Any, where: str, depth: int) -> Any:
    """A copy of `value` in plain JSON types, or InvalidInputError naming where it fails."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not rules.INT64_MIN <= value <= rules.INT64_MAX:
            raise InvalidInputError(f"{where}: the integer {value} is outside int64", where)
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInputError(f"{where}: {value} is not JSON (not finite)", where)
        return float(value)
    if isinstance(value, str):
        return _text(value, where)
    if depth > MAX_DEPTH:
        raise InvalidInputError(f"{where}: nested deeper than {MAX_DEPTH} levels", where)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidInputError(
                    f"{where}: the key {key!r} is not a string (not JSON)", where
                )
            out[_text(key, where)] = _json(item, f"{where}.{key}", depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_json(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise InvalidInputError(f"{where}: a {type(value).__name__} is not JSON", where)


def _text(text: str, where: str) -> str:
    why = rules.utf8_error(text)
    if why:
        raise InvalidInputError(f"{where}: the string {why}", where)
    return str(text)


def check_filter(filter: Mapping[str, Any] | None) -> dict[str, str | int | bool]:
    """Exact-match conditions: payload key -> str, int64 or bool (what Qdrant matches exactly)."""
    if filter is None:
        return {}
    if not isinstance(filter, Mapping):
        raise InvalidInputError(f"filter: expected a dict, got {type(filter).__name__}", "filter")
    for key, value in filter.items():
        if not isinstance(key, str) or not key:
            raise InvalidInputError(f"filter: key {key!r} is not a non-empty string", "filter")
        if key in RESERVED_KEYS:
            raise InvalidInputError(f"filter[{key!r}]: reserved; the store sets it", "filter")
        if any(c in key for c in rules.UNQUOTABLE) or rules.utf8_error(key):
            raise InvalidInputError(
                f"filter[{key!r}]: no payload key holds a quote, a backslash or a lone surrogate",
                "filter",
            )
        if not isinstance(value, str | int | bool):
            raise InvalidInputError(
                f"filter[{key!r}]: {value!r} is not a str, int or bool (exact match only)", "filter"
            )
        if isinstance(value, str):
            _text(value, f"filter[{key!r}]")
        elif not isinstance(value, bool) and not rules.INT64_MIN <= value <= rules.INT64_MAX:
            raise InvalidInputError(
                f"filter[{key!r}]: the integer {value} is outside int64", "filter"
            )
    return dict(filter)


def filter_key(key: str) -> str:
    """The Qdrant path naming top-level key `key` itself (check_filter kept quotes out)."""
    return f'"{key}"'


def user_payload(payload: Mapping[str, Any] | None) -> dict[str, Any]:
    """A stored payload as a response can carry it: the store's own keys dropped, and what
    JSON cannot hold (stored before the rules above) escaped."""
    return {
        readable(key): readable(value)
        for key, value in (payload or {}).items()
        if key not in RESERVED_KEYS
    }


def readable(value: Any, depth: int = 0) -> Any:
    """`value` with lone surrogates replaced by U+FFFD and non-finite floats by None."""
    if isinstance(value, str):
        if rules.utf8_error(value) is None:
            return value
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bool | int | float) or value is None:
        return value
    if depth >= MAX_DEPTH:
        return None
    if isinstance(value, Mapping):
        return {readable(k, depth): readable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [readable(item, depth + 1) for item in value]
    return readable(str(value), depth)
