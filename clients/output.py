"""What the `lpi` command line writes: a table or a summary for people, JSON or JSON lines for
programs, and errors as one line.

`-o table` is the default on a terminal, `-o json` when stdout is a pipe or a file, so scripts
get JSON without asking and people get tables without asking.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from pydantic import BaseModel, TypeAdapter, ValidationError

FORMATS = ("table", "json", "jsonl")
_JSON = TypeAdapter(Any)


@dataclass
class Result:
    """One command's answer: `data` for JSON, `text` for people, `items` one per JSON line
    (defaults to `data` itself)."""

    data: Any
    text: str
    items: list[Any] | None = field(default=None)


def default_format(stream: TextIO | None = None) -> str:
    stream = stream or sys.stdout
    return "table" if getattr(stream, "isatty", lambda: False)() else "json"


def emit(result: Result, fmt: str, stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    if fmt == "table":
        stream.write(result.text.rstrip("\n") + "\n")
    elif fmt == "jsonl":
        for item in result.items if result.items is not None else [result.data]:
            stream.write(_JSON.dump_json(item).decode() + "\n")
    else:
        stream.write(_JSON.dump_json(result.data).decode() + "\n")


def error_line(err: BaseException) -> str:
    """Any failure as one line: pydantic's errors as `field: message; ...` without its links."""
    if isinstance(err, ValidationError):
        parts = []
        for item in err.errors(include_url=False)[:5]:
            where = ".".join(str(p) for p in item["loc"])
            parts.append(f"{where}: {item['msg']}" if where else item["msg"])
        return "; ".join(parts)
    return " ".join(str(err).split()) or type(err).__name__


def dump(model: Any) -> Any:
    return model.model_dump(mode="json") if isinstance(model, BaseModel) else model
