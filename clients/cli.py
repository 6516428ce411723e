"""`lpi`: lpi-serve from the shell, over the SDK. Every command writes one JSON document to stdout;
an error writes its message (the server's, for a refused request) to stderr and exits 1.

    lpi embed --task coco --text "a dog" --image dog.jpg
    lpi index --task coco photos/            a folder of images; ids are their relative paths
    lpi index --task coco items.jsonl        lines of {"id", "text" or "image" (a path), "payload"}
    lpi search --task coco --text "a dog" --top-k 5 --filter split=val
    lpi tasks list | get T | load T FILE [--promote] | load T --server-path P | promote T V
    lpi tasks unload T [--delete-vectors]
    lpi health                               exits 1 when the server is not ready

The server and keys: --url, --api-key, --admin-key (before the command), or LPI_URL,
LPI_API_KEY, LPI_ADMIN_KEY.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from pydantic import TypeAdapter, ValidationError

from clients.base import DEFAULT_CHUNK, DEFAULT_TIMEOUT, DEFAULT_URL, image_item, merge_embeddings
from clients.errors import LpiError
from clients.sync import Client
from wire import schema

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_JSON = TypeAdapter(Any)


def main(argv: Sequence[str] | None = None, *, transport: httpx.BaseTransport | None = None) -> int:
    """Run one command; returns the exit status. `transport` replaces the network (tests)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="lpi: %(message)s")
    try:
        with Client(
            args.url,
            api_key=args.api_key,
            admin_key=args.admin_key,
            timeout=args.timeout,
            retries=args.retries,
            transport=transport,
        ) as client:
            return args.run(client, args)
    except LpiError as err:
        sys.stderr.write(f"lpi: {err}\n")
    except (OSError, ValueError, TypeError) as err:  # unreadable files, bad JSON, invalid input
        sys.stderr.write(f"lpi: error: {err}\n")
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lpi",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    env = os.environ.get
    parser.add_argument(
        "--url",
        default=env("LPI_URL", DEFAULT_URL),
        help="the server (env LPI_URL; default %(default)s)",
    )
    parser.add_argument("--api-key", default=env("LPI_API_KEY"), help="env LPI_API_KEY")
    parser.add_argument(
        "--admin-key",
        default=env("LPI_ADMIN_KEY"),
        help="for tasks load/promote/unload (env LPI_ADMIN_KEY)",
    )
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds")
    parser.add_argument("--retries", type=int, default=3, help="on 503 and lost connections")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser("embed", help="embed texts and images")
    embed.add_argument("--task", help="a loaded task, 'auto', or none for the bare backbone")
    embed.add_argument("--text", action="append", default=[], help="repeatable")
    embed.add_argument("--image", action="append", default=[], type=Path, help="repeatable")
    embed.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK)
    embed.set_defaults(run=_embed)

    index = commands.add_parser("index", help="index a folder of images or a JSONL of items")
    index.add_argument("source", type=Path, help="a folder of images, or a .jsonl file")
    index.add_argument("--task", required=True)
    index.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help="items per request")
    index.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    index.set_defaults(run=_index)

    search = commands.add_parser("search", help="nearest stored items to a query")
    search.add_argument("--task", required=True)
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text")
    query.add_argument("--image", type=Path)
    query.add_argument("--vector-json", help="a JSON list of floats, or @FILE holding one")
    search.add_argument("--top-k", type=int, default=10)
    search.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="exact payload match, repeatable; true/false/integers are typed, "
        "quote to keep a string: key='\"7\"'",
    )
    search.add_argument(
        "--accept-mismatch",
        action="store_true",
        help="search the serving version with the newest version's query",
    )
    search.set_defaults(run=_search)

    _tasks_parser(commands.add_parser("tasks", help="list, inspect, load, promote, unload tasks"))
    health = commands.add_parser("health", help="liveness and readiness")
    health.set_defaults(run=_health)
    return parser


def _tasks_parser(tasks: argparse.ArgumentParser) -> None:
    actions = tasks.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="every loaded task").set_defaults(run=_tasks_list)
    get = actions.add_parser("get", help="one task")
    get.add_argument("task")
    get.set_defaults(run=_tasks_get)
    load = actions.add_parser("load", help="load or replace a task's prompts (admin key)")
    load.add_argument("task")
    load.add_argument("file", nargs="?", type=Path, help="a local artifact, uploaded")
    load.add_argument("--server-path", help="instead: a path in the server's artifact directory")
    load.add_argument("--promote", action="store_true", help="also serve it to /search now")
    load.set_defaults(run=_tasks_load)
    promote = actions.add_parser("promote", help="make a loaded version the searched one")
    promote.add_argument("task")
    promote.add_argument("version")
    promote.set_defaults(run=_tasks_promote)
    unload = actions.add_parser("unload", help="stop serving a task (admin key)")
    unload.add_argument("task")
    unload.add_argument("--delete-vectors", action="store_true")
    unload.set_defaults(run=_tasks_unload)


# -- commands: each writes its JSON and returns the exit status ---------------------------------


def _embed(client: Client, args: argparse.Namespace) -> int:
    if not args.text and not args.image:
        raise ValueError("embed: give --text or --image")
    chunk = {"task": args.task, "chunk_size": args.chunk_size}
    parts = [client.embed_texts(args.text, **chunk)] if args.text else []
    parts += [client.embed_images(args.image, **chunk)] if args.image else []
    return _emit(merge_embeddings(parts))


def _index(client: Client, args: argparse.Namespace) -> int:
    source: Path = args.source
    items = _folder_items(source) if source.is_dir() else _jsonl_items(source)
    answers = client.index_many(
        args.task, items, chunk_size=args.chunk_size, progress=not args.no_progress
    )
    return _emit(
        {
            "task": args.task,
            "count": sum(len(a.ids) for a in answers),
            "prompt_versions": sorted({a.prompt_version for a in answers}),
            "serving": all(a.serving for a in answers),
            "ids": [i for a in answers for i in a.ids],
        }
    )


def _search(client: Client, args: argparse.Namespace) -> int:
    vector = None if args.vector_json is None else _vector(args.vector_json)
    answer = client.search(
        args.task,
        text=args.text,
        image=args.image,
        vector=vector,
        top_k=args.top_k,
        filter=dict(_filter(f) for f in args.filter) or None,
        accept_mismatch=args.accept_mismatch,
    )
    return _emit(answer)


def _tasks_list(client: Client, args: argparse.Namespace) -> int:
    return _emit(client.list_tasks())


def _tasks_get(client: Client, args: argparse.Namespace) -> int:
    return _emit(client.get_task(args.task))


def _tasks_load(client: Client, args: argparse.Namespace) -> int:
    answer = client.load_task(
        args.task, args.file, server_path=args.server_path, promote=args.promote
    )
    return _emit(answer)


def _tasks_promote(client: Client, args: argparse.Namespace) -> int:
    return _emit(client.promote(args.task, args.version))


def _tasks_unload(client: Client, args: argparse.Namespace) -> int:
    return _emit(client.unload_task(args.task, delete_vectors=args.delete_vectors))


def _health(client: Client, args: argparse.Namespace) -> int:
    readiness = client.ready()
    _emit({"health": client.health(), "readiness": readiness})
    if not readiness.ready:
        sys.stderr.write(f"lpi: not ready: {'; '.join(readiness.reasons)}\n")
    return 0 if readiness.ready else 1


# -- inputs -------------------------------------------------------------------------------------


class _Lazy:
    """Items made one at a time as their chunk is sent (files are read late); sized for the
    progress bar."""

    def __init__(self, sources: list, make: Callable[[Any], schema.IndexItem]) -> None:
        self._sources, self._make = sources, make

    def __len__(self) -> int:
        return len(self._sources)

    def __iter__(self) -> Iterator[schema.IndexItem]:
        return map(self._make, self._sources)


def _folder_items(folder: Path) -> _Lazy:
    """Every image under `folder`; id and payload["path"]: the path relative to it."""
    paths = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not paths:
        raise ValueError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")

    def make(path: Path) -> schema.IndexItem:
        relative = path.relative_to(folder).as_posix()
        return image_item(path, id=_point_id(relative), payload={"path": relative})

    return _Lazy(paths, make)


def _jsonl_items(path: Path) -> _Lazy:
    """Lines of {"id"?, "text" | "image" (a path, relative to the file), "payload"?}; every
    line is checked before anything is sent, images are read when their chunk is."""
    rows = []
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

    def make(row: schema.IndexItem | dict) -> schema.IndexItem:
        if isinstance(row, schema.IndexItem):
            return row
        return image_item(row["image"], id=row.get("id"), payload=row.get("payload"))

    return _Lazy(rows, make)


def _point_id(relative: str) -> str:
    if len(relative) <= schema.MAX_ID_LENGTH:
        return relative
    return str(uuid.uuid5(uuid.NAMESPACE_URL, relative))


def _vector(text: str) -> list[float]:
    raw = Path(text[1:]).read_text(encoding="utf-8") if text.startswith("@") else text
    vector = json.loads(raw)
    if not isinstance(vector, list) or not all(isinstance(v, (int, float)) for v in vector):
        raise ValueError("--vector-json: give a JSON list of numbers")
    return [float(v) for v in vector]


def _filter(text: str) -> tuple[str, schema.FilterValue]:
    """key=value; a JSON boolean or integer value is typed, anything else stays a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--filter {text!r}: give KEY=VALUE")
    try:
        parsed = json.loads(value)
    except ValueError:
        return key, value
    return key, parsed if isinstance(parsed, (bool, int, str)) else value


def _emit(result: Any) -> int:
    sys.stdout.write(_JSON.dump_json(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
