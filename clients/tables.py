"""Text for people: aligned tables that fit the terminal, ages in words, short payloads.

No dependency: plain strings, so the `lpi` command line stays as light as the SDK.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

MIN_WIDTH = 8  # the narrowest a shrunk column gets


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], width: int | None = None) -> str:
    """Left-aligned columns (numbers right-aligned), the widest shrunk to fit `width`."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    limit = width or shutil.get_terminal_size((120, 24)).columns
    while sum(widths) + 2 * (len(widths) - 1) > limit and max(widths) > MIN_WIDTH:
        widest = widths.index(max(widths))
        widths[widest] -= 1
    numeric = [bool(rows) and all(_is_number(row[i]) for row in rows) for i in range(len(headers))]
    lines = [_line(headers, widths, [False] * len(headers))]
    lines.append("  ".join("-" * w for w in widths))
    lines += [_line(row, widths, numeric) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def key_values(pairs: Mapping[str, Any]) -> str:
    """`key: value` lines, keys aligned."""
    width = max(map(len, pairs), default=0)
    return "\n".join(f"{key.rjust(width)}: {_cell(value)}" for key, value in pairs.items())


def age(since: float, now: float | None = None) -> str:
    """Seconds since a Unix time, in words: 'just now', '5 minutes ago', '3 days ago'."""
    seconds = max(0.0, (now if now is not None else time.time()) - since)
    if seconds < 10:
        return "just now"
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''} ago"
    return "just now"


def short_payload(payload: Mapping[str, Any], limit: int = 80) -> str:
    """Compact JSON of a payload, thumbnails named rather than printed, cut at `limit`."""
    shown = {k: ("<thumbnail>" if k == "thumbnail" else v) for k, v in payload.items()}
    text = json.dumps(shown, ensure_ascii=False, separators=(", ", ": ")) if shown else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list | tuple):
        return ", ".join(map(_cell, value)) or "-"
    return " ".join(str(value).split())  # one line per row


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _line(values: Sequence[Any], widths: list[int], numeric: list[bool]) -> str:
    out = []
    for value, width, right in zip(values, widths, numeric, strict=True):
        text = _cell(value) if not isinstance(value, str) else value
        text = text if len(text) <= width else text[: width - 1] + "…"
        out.append(text.rjust(width) if right else text.ljust(width))
    return "  ".join(out)
