"""Task-split manifests: one JSON object per line, checked in full before training starts.

A record is one image with its captions, its task and its split:

    {"image": "img/a.png", "captions": ["a dog", "a brown dog"], "task": "animal", "split": "test"}

Relative image paths are relative to the manifest's folder. Every problem a long run would
otherwise meet hours in (a typo'd field, an empty caption, a missing file, an image listed
twice) is found by `read_manifest` up front and reported as one `ManifestError` whose message
starts with `file:line:`, like a compiler's, so it can be fixed without a debugger.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lpi import atomic

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FIELDS = {"image": str, "captions": list, "task": str, "split": str}


class ManifestError(ValueError):
    """A manifest that cannot be trained on; the message names the file and line."""


@dataclass(frozen=True)
class Record:
    """One image: its absolute path (when read), its captions, task and split."""

    image: Path
    captions: tuple[str, ...]
    task: str
    split: str


def read_manifest(
    path: str | os.PathLike, tasks: Sequence[str] | None = None, check_images: bool = True
) -> list[Record]:
    """Parse and validate a JSONL manifest; `tasks` must each have training records."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ManifestError(f"{path}: cannot read the manifest ({error.strerror})") from error
    folder = Path(os.path.abspath(path.parent))
    records, lines = [], []
    for number, raw in enumerate(data.splitlines(), start=1):
        if raw.strip():
            records.append(_parse_line(path, number, raw, folder, check_images))
            lines.append(number)
    if not records:
        raise ManifestError(f"{path}: the manifest holds no records")
    _check_duplicates(path, records, lines)
    if tasks is not None:
        _check_tasks(path, records, tasks)
    return records


def write_manifest(path: str | os.PathLike, records: Iterable[Record]) -> None:
    """Write records atomically; images under the manifest's folder are stored relative."""
    path = Path(path)
    folder = Path(os.path.abspath(path.parent))
    lines = []
    for index, record in enumerate(records):
        _check_record(f"{path}: record {index}", record)
        lines.append(json.dumps(_to_json(record, folder), ensure_ascii=False))
    atomic.write_text(path, "".join(line + "\n" for line in lines))


def tasks(records: Iterable[Record]) -> list[str]:
    """Task names in order of first appearance: the order tasks arrive in training."""
    return list(dict.fromkeys(record.task for record in records))


def select(
    records: Iterable[Record],
    task: str | Iterable[str] | None = None,
    split: str | Iterable[str] | None = None,
) -> list[Record]:
    """The records of the given task(s) and split(s), in manifest order (None = all)."""
    wanted_tasks = _as_set(task)
    wanted_splits = _as_set(split)
    return [
        record
        for record in records
        if (wanted_tasks is None or record.task in wanted_tasks)
        and (wanted_splits is None or record.split in wanted_splits)
    ]


def group(records: Iterable[Record]) -> dict[tuple[str, str], list[Record]]:
    """Records keyed by (task, split), keys in order of first appearance."""
    groups: dict[tuple[str, str], list[Record]] = {}
    for record in records:
        groups.setdefault((record.task, record.split), []).append(record)
    return groups


def _as_set(value: str | Iterable[str] | None) -> set[str] | None:
    if value is None:
        return None
    return {value} if isinstance(value, str) else set(value)


def _parse_line(path: Path, number: int, raw: bytes, folder: Path, check_images: bool) -> Record:
    where = f"{path}:{number}"
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ManifestError(f"{where}: not UTF-8 ({error.reason})") from error
    except json.JSONDecodeError as error:
        raise ManifestError(
            f"{where}: malformed JSON ({error.msg}, column {error.colno})"
        ) from error
    _check_fields(where, obj)
    if obj["image"].strip() == "":
        raise ManifestError(f"{where}: 'image' is empty")
    record = Record(
        image=Path(os.path.normpath(folder / obj["image"])),
        captions=tuple(obj["captions"]),
        task=obj["task"],
        split=obj["split"],
    )
    _check_record(where, record)
    if check_images and not record.image.is_file():
        raise ManifestError(f"{where}: image file not found: {record.image}")
    return record


def _check_fields(where: str, obj: object) -> None:
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [name for name in FIELDS if name not in obj]
    if missing:
        raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}")
    extra = sorted(set(obj) - set(FIELDS))
    if extra:
        raise ManifestError(
            f"{where}: unknown field(s) {', '.join(extra)}; a record has {', '.join(FIELDS)}"
        )
    for name, kind in FIELDS.items():
        if not isinstance(obj[name], kind):
            raise ManifestError(
                f"{where}: '{name}' must be a {kind.__name__}, got {type(obj[name]).__name__}"
            )


def _check_record(where: str, record: Record) -> None:
    """The checks shared by reading and writing: captions, task name, split."""
    if not isinstance(record.captions, tuple | list) or len(record.captions) == 0:
        raise ManifestError(f"{where}: 'captions' is empty; every image needs a caption")
    for index, caption in enumerate(record.captions):
        if not isinstance(caption, str):
            raise ManifestError(f"{where}: captions[{index}] is {type(caption).__name__}, not str")
        if not caption.strip():
            raise ManifestError(f"{where}: captions[{index}] is empty or whitespace")
    if not isinstance(record.task, str) or not record.task.strip():
        raise ManifestError(f"{where}: 'task' is empty")
    if record.split not in SPLITS:
        raise ManifestError(
            f"{where}: unknown split {record.split!r}; expected one of {', '.join(SPLITS)}"
        )


def _check_duplicates(path: Path, records: list[Record], lines: list[int]) -> None:
    """An image twice in one split is an error; in two splits it leaks test data (a warning)."""
    first: dict[tuple[Path, str], int] = {}
    splits_of: dict[Path, set[str]] = {}
    for record, number in zip(records, lines, strict=True):
        key = (record.image, record.split)
        if key in first:
            raise ManifestError(
                f"{path}:{number}: image {record.image} is already in split "
                f"'{record.split}' at line {first[key]}"
            )
        first[key] = number
        splits_of.setdefault(record.image, set()).add(record.split)
    leaked = sum(len(splits) > 1 for splits in splits_of.values())
    if leaked:
        log.warning("%s: %d image(s) appear in more than one split", path, leaked)


def _check_tasks(path: Path, records: list[Record], wanted: Sequence[str]) -> None:
    trained = {record.task for record in records if record.split == "train"}
    missing = [task for task in wanted if task not in trained]
    if missing:
        have = ", ".join(task for task in tasks(records) if task in trained) or "none"
        raise ManifestError(
            f"{path}: task(s) {', '.join(missing)} have no 'train' records "
            f"(tasks with training data: {have})"
        )


def _to_json(record: Record, folder: Path) -> dict:
    # A relative path is the writer's, relative to the working directory (`--out data/x`),
    # never to the manifest: store it relative to the manifest's folder like an absolute one.
    absolute = os.path.abspath(record.image)
    relative = os.path.relpath(absolute, folder)
    outside = relative == os.pardir or relative.startswith(os.pardir + os.sep)
    image = Path(absolute if outside else relative)
    return {
        "image": image.as_posix(),
        "captions": list(record.captions),
        "task": record.task,
        "split": record.split,
    }
