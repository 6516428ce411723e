"""What the `lpi` command line reads: folders of images, JSONL item files, vectors, filters.

Items are made lazily, one chunk at a time as it is sent, so a large folder is never held in
memory; every JSONL line is checked before anything is sent.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from clients.calls import image_item
from wire import schema

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class LazyItems:
    """Items made one at a time as their chunk is sent (files are read late); sized for the
    progress bar."""

    def __init__(self, sources: list[Any], make: Callable[[Any], schema.IndexItem]) -> None:
        self._sources, self.make = sources, make

    def __len__(self) -> int:
        return len(self._sources)

    def __iter__(self) -> Iterator[schema.IndexItem]:
        return map(self.make, self._sources)


def folder_items(folder: Path) -> LazyItems:
    """Every image under `folder`; id and payload["path"]: the path relative to it."""
    paths = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not paths:
        raise ValueError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")

    def make(path: Path) -> schema.IndexItem:
        relative = path.relative_to(folder).as_posix()
        return image_item(path, id=point_id(relative), payload={"path": relative})

    return LazyItems(paths, make)


def jsonl_items(path: Path) -> LazyItems:
    """Lines of {"id"?, "text" | "image" (a path, relative to the file), "payload"?}; every
    line is checked before anything is sent, images are read when their chunk is."""
    rows: list[schema.IndexItem | dict[str, Any]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
            if isinstance(row, dict) and isinstance(row.get("image"), str):
                image = path.parent / row["image"]
                if not image.is_file():
                    raise ValueError(f"image: no file {image}")
                schema.IndexItem.model_validate(row | {"image": "checked-later"})
                rows.append(row | {"image": image})
            else:
                rows.append(schema.IndexItem.model_validate(row))
        except (ValueError, ValidationError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(f"{where}: {err}") from None
    if not rows:
        raise ValueError(f"{path}: no items")

    def make(row: schema.IndexItem | dict[str, Any]) -> schema.IndexItem:
        if isinstance(row, schema.IndexItem):
            return row
        return image_item(row["image"], id=row.get("id"), payload=row.get("payload"))

    return LazyItems(rows, make)


def point_id(relative: str) -> str:
    if len(relative) <= schema.MAX_ID_LENGTH:
        return relative
    return str(uuid.uuid5(uuid.NAMESPACE_URL, relative))


def parse_vector(text: str) -> list[float]:
    raw = Path(text[1:]).read_text(encoding="utf-8") if text.startswith("@") else text
    vector = json.loads(raw)
    if not isinstance(vector, list) or not all(isinstance(v, (int, float)) for v in vector):
        raise ValueError("--vector-json: give a JSON list of numbers")
    return [float(v) for v in vector]


def parse_filter(text: str) -> tuple[str, schema.FilterValue]:
    """key=value; a JSON boolean or integer value is typed, anything else stays a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--filter {text!r}: give KEY=VALUE")
    try:
        parsed = json.loads(value)
    except ValueError:
        return key, value
    return key, parsed if isinstance(parsed, (bool, int, str)) else value
