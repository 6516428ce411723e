"""What the `lpi` command line reads: folders of images, JSONL item files, vectors, filters.

Items are made lazily, one chunk at a time as it is sent, so a large folder or JSONL file is
never held in memory; every JSONL line is checked before anything is sent.
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


class MappedItems:
    """`fn` applied to each of `items` as it is sent, keeping their size (the progress bar's)."""

    def __init__(
        self, items: LazyItems | JsonlItems, fn: Callable[[schema.IndexItem], schema.IndexItem]
    ) -> None:
        self._items, self._fn = items, fn

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[schema.IndexItem]:
        return map(self._fn, self._items)


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


class JsonlItems:
    """A JSONL file's items, streamed: `__iter__` reads the file again line by line, so neither
    the lines nor their vectors are ever all in memory (a file larger than memory indexes)."""

    def __init__(self, path: Path, count: int) -> None:
        self.path, self._count = path, count

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[schema.IndexItem]:
        for number, line in _lines(self.path):
            yield _jsonl_item(self.path, number, line)


def jsonl_items(path: Path) -> JsonlItems:
    """Lines of {"id"?, "text" | "image" (a path, relative to the file), "vector"?, "payload"?};
    every line is checked before anything is sent (a bad line 1,000,000 never leaves half an
    index), images (inside the file's folder) are read when their chunk is. A row without an id
    gets `FILE:LINE`, the same on every run, so `--resume` skips what an earlier run stored."""
    count = 0
    for number, line in _lines(path):
        _jsonl_item(path, number, line, check_only=True)
        count += 1
    if not count:
        raise ValueError(f"{path}: no items")
    return JsonlItems(path, count)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                yield number, line


def _jsonl_item(path: Path, number: int, line: str, check_only: bool = False) -> schema.IndexItem:
    try:
        row = json.loads(line)
        if isinstance(row, dict) and "id" not in row:  # the same id on every run: resumable
            row["id"] = point_id(f"{path.name}:{number}")
        if isinstance(row, dict) and isinstance(row.get("image"), str):
            image = (path.parent / row["image"]).resolve()
            if not image.is_relative_to(path.parent.resolve()):
                raise ValueError(f"image: {row['image']!r} is outside the file's folder")
            if not image.is_file():
                raise ValueError(f"image: no file {image}")
            checked = schema.IndexItem.model_validate(row | {"image": "checked-later"})
            if check_only:
                return checked
            item = image_item(image, id=row["id"], payload=row.get("payload"))
            return item.model_copy(update={"thumbnail": checked.thumbnail})
        return schema.IndexItem.model_validate(row)
    except (ValueError, ValidationError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}:{number}: {err}") from None


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
