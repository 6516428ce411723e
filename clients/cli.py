"""`lpi`: lpi-serve from the shell, over the SDK. Tables and summaries on a terminal; JSON when
piped (or `-o json`), one JSON value per line with `-o jsonl`; an error is one line on stderr
(the server's message, for a refused request) and exit status 1.

    lpi tasks list                           versions, vector counts, age
    lpi embed --task coco --text "a dog" --image dog.jpg
    lpi index --task coco photos/            a folder of images; ids are their relative paths
    lpi index --task coco items.jsonl        lines of {"id", "text" or "image" (a path), "payload"}
    lpi search --task coco --text "a dog" --top-k 5 --filter split=val
    lpi points count coco | list coco [--filter K=V] | delete coco --id ID / --filter K=V
    lpi tasks get T | load T FILE [--promote] | load T --server-path P
    lpi tasks promote T [VERSION] [--force] | unload T [--delete-vectors]
    lpi health                               exits 1 when the server is not ready
    lpi -o json tasks list | jq .            JSON for scripts (the default when piped)

The server and keys: --url, --api-key, --admin-key (before the command), or LPI_URL,
LPI_API_KEY, LPI_ADMIN_KEY.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx
from pydantic import ValidationError

from clients.base import DEFAULT_CHUNK, DEFAULT_TIMEOUT, DEFAULT_URL
from clients.calls import merge_embeddings
from clients.cli_inputs import (
    JsonlItems,
    LazyItems,
    MappedItems,
    folder_items,
    jsonl_items,
    parse_filter,
    parse_vector,
)
from clients.errors import LpiError
from clients.output import FORMATS, Result, default_format, dump, emit, error_line
from clients.sync import Client
from clients.tables import age, key_values, short_payload, table
from wire import schema


def main(argv: Sequence[str] | None = None, *, transport: httpx.BaseTransport | None = None) -> int:
    """Run one command; returns the exit status. `transport` replaces the network (tests)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="lpi: %(message)s")
    fmt = args.output or default_format()
    try:
        with Client(
            args.url,
            api_key=args.api_key,
            admin_key=args.admin_key,
            timeout=args.timeout,
            retries=args.retries,
            transport=transport,
        ) as client:
            result, status = args.run(client, args)
        emit(result, fmt)
        return int(status)
    except LpiError as err:
        sys.stderr.write(f"lpi: {error_line(err)}\n")
    except (OSError, ValueError, TypeError, ValidationError) as err:  # files, JSON, bad input
        sys.stderr.write(f"lpi: error: {error_line(err)}\n")
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
    parser.add_argument(
        "--api-key", default=env("LPI_API_KEY"), help="for queries (env LPI_API_KEY; default: none)"
    )
    parser.add_argument(
        "--admin-key",
        default=env("LPI_ADMIN_KEY"),
        help="for tasks load/promote/unload (env LPI_ADMIN_KEY; default: none)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds per request (default %(default)s)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=3,
        help="resends on 503, unopened connections and, for calls safe twice, lost answers "
        "(default %(default)s)",
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        help="table on a terminal, json when piped (the default), or jsonl",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser("embed", help="embed texts and images (a summary, or -o json)")
    embed.add_argument("--task", help="a loaded task, 'auto', or none for the bare backbone")
    embed.add_argument("--text", action="append", default=[], help="repeatable")
    embed.add_argument("--image", action="append", default=[], type=Path, help="repeatable")
    embed.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK,
        help="inputs per request (default %(default)s)",
    )
    embed.set_defaults(run=_embed)

    index = commands.add_parser("index", help="index a folder of images or a JSONL of items")
    index.add_argument("source", type=Path, help="a folder of images, or a .jsonl file")
    index.add_argument("--task", required=True)
    index.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK,
        help="items per request (default %(default)s)",
    )
    index.add_argument(
        "--thumbnail",
        action="store_true",
        help="store a small JPEG of each image for the /ui page (default: off)",
    )
    index.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    index.add_argument(
        "--resume",
        action="store_true",
        help="skip ids already stored under "
        "the task's version: re-run an interrupted run (default: off)",
    )
    index.add_argument(
        "--prompt-version",
        help='the version that computed JSONL items\' "vector"s (needed with them; default: none)',
    )
    index.set_defaults(run=_index)

    search = commands.add_parser("search", help="nearest stored items to a query")
    search.add_argument("--task", required=True)
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text")
    query.add_argument("--image", type=Path)
    query.add_argument("--vector-json", help="a JSON list of floats, or @FILE holding one")
    search.add_argument("--top-k", type=int, default=10, help="hits (default %(default)s)")
    _filter_flag(search)
    search.add_argument(
        "--accept-mismatch",
        action="store_true",
        help="search the serving version with the newest version's query",
    )
    search.set_defaults(run=_search)

    _points_parser(commands.add_parser("points", help="count, list or delete stored points"))
    _tasks_parser(commands.add_parser("tasks", help="list, inspect, load, promote, unload tasks"))
    health = commands.add_parser("health", help="liveness and readiness")
    health.set_defaults(run=_health)
    return parser


def _filter_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="exact payload match, repeatable; true/false/integers are typed, quote to keep a "
        "string: key='\"7\"' (default: none)",
    )


def _points_parser(points: argparse.ArgumentParser) -> None:
    actions = points.add_subparsers(dest="action", required=True, metavar="ACTION")
    count = actions.add_parser("count", help="points of the task's serving version")
    listing = actions.add_parser("list", help="ids and payloads, a page at a time")
    listing.add_argument("--limit", type=int, default=20, help="per page (default %(default)s)")
    listing.add_argument("--offset", help="next_offset of the previous page (default: first)")
    listing.add_argument("--all", action="store_true", help="every page (default: one)")
    delete = actions.add_parser("delete", help="delete points by id or by filter")
    delete.add_argument("--id", action="append", dest="ids", help="repeatable")
    for parser, run in ((count, _points_count), (listing, _points_list), (delete, _points_del)):
        parser.add_argument("task")
        _filter_flag(parser)
        parser.set_defaults(run=run)


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
    promote.add_argument(
        "version", nargs="?", help="a loaded version (default: the newest, which /embed uses)"
    )
    promote.add_argument(
        "--force",
        action="store_true",
        help="promote even a version with no vectors while the serving one has some (/search "
        "then finds nothing until it is indexed; refused without this flag) (default: off)",
    )
    promote.set_defaults(run=_tasks_promote)
    unload = actions.add_parser("unload", help="stop serving a task (admin key)")
    unload.add_argument("task")
    unload.add_argument("--delete-vectors", action="store_true", help="(default: kept)")
    unload.set_defaults(run=_tasks_unload)


# -- commands: each returns its Result and exit status -----------------------------------------


def _embed(client: Client, args: argparse.Namespace) -> tuple[Result, int]:
    if not args.text and not args.image:
        raise ValueError("embed: give --text or --image")
    chunk = {"task": args.task, "chunk_size": args.chunk_size}
    parts = [client.embed_texts(args.text, **chunk)] if args.text else []
    parts += [client.embed_images(args.image, **chunk)] if args.image else []
    answer = merge_embeddings(parts)
    rows = (answer.text_embeddings or []) + (answer.image_embeddings or [])
    counts = f"{len(answer.text_embeddings or [])} text, {len(answer.image_embeddings or [])} image"
    by = f"task {answer.task}" if answer.task else "the bare backbone"
    version = f", prompt version {answer.prompt_version[:12]}" if answer.prompt_version else ""
    text = (
        f"{len(rows)} embeddings ({counts}) of dimension {len(rows[0])} from {by}{version}; "
        "-o json prints the vectors"
    )
    return Result(dump(answer), text, rows), 0


def _index(client: Client, args: argparse.Namespace) -> tuple[Result, int]:
    items = folder_items(args.source) if args.source.is_dir() else jsonl_items(args.source)
    answers = client.index_many(
        args.task,
        _thumbnailed(items, args.thumbnail),
        chunk_size=args.chunk_size,
        progress=not args.no_progress,
        skip_existing=args.resume,
        prompt_version=args.prompt_version,
    )
    ids = [i for a in answers for i in a.ids]
    skipped = sum(len(a.skipped) for a in answers)
    versions = sorted({a.prompt_version for a in answers})
    serving = all(a.serving for a in answers)
    data = {
        "task": args.task,
        "count": len(ids),
        "prompt_versions": versions,
        "serving": serving,
        "ids": ids,
        "skipped": skipped,
    }
    note = "searchable now" if serving else "searchable once this version is promoted"
    text = f"indexed {len(ids)} items into {args.task} (version {', '.join(versions)}): {note}"
    text += f"; {skipped} already stored, skipped" if skipped else ""
    return Result(data, text, ids), 0


def _thumbnailed(
    items: LazyItems | JsonlItems, wanted: bool
) -> LazyItems | JsonlItems | MappedItems:
    return MappedItems(items, _with_thumbnail) if wanted else items


def _with_thumbnail(item: schema.IndexItem) -> schema.IndexItem:
    return item.model_copy(update={"thumbnail": True}) if item.image is not None else item


def _search(client: Client, args: argparse.Namespace) -> tuple[Result, int]:
    vector = None if args.vector_json is None else parse_vector(args.vector_json)
    answer = client.search(
        args.task,
        text=args.text,
        image=args.image,
        vector=vector,
        top_k=args.top_k,
        filter=dict(parse_filter(f) for f in args.filter) or None,
        accept_mismatch=args.accept_mismatch,
    )
    rows = [
        (rank, h.id, h.score, short_payload(h.payload)) for rank, h in enumerate(answer.hits, 1)
    ]
    text = table(("#", "id", "score", "payload"), rows) if rows else "no hits"
    text += f"\n{answer.task}, prompt version {answer.index_version[:12]}"
    return Result(dump(answer), text, [dump(h) for h in answer.hits]), 0


def _filters(args: argparse.Namespace) -> dict[str, schema.FilterValue] | None:
    return dict(parse_filter(f) for f in args.filter) or None


def _points_count(client: Client, args: argparse.Namespace) -> tuple[Result, int]:
    count = client.count_points(args.task, _filters(args))
    data = {"task": args.task, "count": count}
    return Result(data, f"{count} points in {args.task}" + _matching(args)), 0


def _points_list(client: Client, args: argparse.Namespace) -> tuple[Result, int]:
    if args.all:
        points, after = client.all_points(args.task, _filters(args)), None
    else:
        page = client.list_points(args.task, _filters(args), limit=args.limit, offset=args.offset)
        points, after = page.points or [], page.next_offset
    data = {"task": args.task, "points": [dump(p) for p in points], "next_offset": after}
    text = table(("id", "payload"), [(p.id, short_payload(p.payload, 100)) for p in points])
    text = text if points else "no points" + _matching(args)
    if after:
        text += f"\nmore: lpi points list {args.task} --offset {after}"
    return Result(data, text, data["points"]), 0


def _points_del(client: Client, args: argparse.Namespace) -> tuple[Result, int]:
    filters = _filters(args)
    if bool(args.ids) == bool(filters):
        raise ValueError("points delete: give --id (repeatable) or --filter, not both")
    deleted = client.delete_points(args.task, args.ids or None, filters)
    data = {"task": args.task, "deleted": deleted}
    return Result(data, f"deleted {deleted} points from {args.task}"), 0


def _matching(args: argparse.Namespace) -> str:
    return f" matching {', '.join(args.filter)}" if args.filter else ""


def _tasks_list(client: Client, args: argparse.Namespace) -> tuple[Result, int]:
    tasks = client.list_tasks().tasks
    rows = [
        (
            t.task,
            t.prompt_version[:12],
            (t.serving_version or "-")[:12],
            len(t.loaded_versions),
            t.vectors,
            ", ".join(t.made_by) or "-",
            t.method or "-",
            age(t.loaded_at),
        )
        for t in tasks
    ]
    headers = ("task", "version", "serving", "loaded", "vectors", "made by", "method", "loaded at")
    text = table(headers, rows) if tasks else "no task loaded (lpi tasks load NAME FILE)"
    return Result({"tasks": [dump(t) for t in tasks]}, text, [dump(t) for t in tasks]), 0


def _task_text(info: schema.TaskInfo) -> str:
    pairs = dump(info) | {"loaded_at": age(info.loaded_at), "ranks": info.ranks}
    return key_values(pairs)


def _tasks_get(client: Client, args: argparse.Namespace) -> tuple[Result, int]:
    info = client.get_task(args.task)
    return Result(dump(info), _task_text(info)), 0


def _tasks_load(client: Client, args: argparse.Namespace) -> tuple[Result, int]:
    answer = client.load_task(
        args.task, args.file, server_path=args.server_path, promote=args.promote
    )
    task = answer.task
    change = f"(was {answer.previous_version})" if answer.changed else "(already loaded)"
    text = f"{task.task}: version {task.prompt_version} serves /embed and /index {change}\n"
    return Result(dump(answer), text + _task_text(task)), 0


def _tasks_promote(client: Client, args: argparse.Namespace) -> tuple[Result, int]:
    version = args.version or client.get_task(args.task).prompt_version
    info = client.promote(args.task, version, force=args.force)
    text = f"{info.task}: version {version} serves /search ({info.vectors} vectors)"
    return Result(dump(info), text), 0


def _tasks_unload(client: Client, args: argparse.Namespace) -> tuple[Result, int]:
    answer = client.unload_task(args.task, delete_vectors=args.delete_vectors)
    kept = "vectors deleted" if answer.vectors_deleted else "vectors kept"
    text = f"{answer.task} unloaded (versions {', '.join(answer.unloaded_versions)}); {kept}"
    return Result(dump(answer), text), 0


def _health(client: Client, args: argparse.Namespace) -> tuple[Result, int]:
    readiness, health = client.ready(), client.health()
    data = {"health": dump(health), "readiness": dump(readiness)}
    text = key_values(
        {
            "alive": health.status,
            "ready": readiness.ready,
            "backbone": readiness.backbone[:12],
            "engine": readiness.engine,
            "tasks": readiness.tasks,
            "queue rows": readiness.queue_rows,
        }
    )
    if not readiness.ready:
        sys.stderr.write(f"lpi: not ready: {'; '.join(readiness.reasons)}\n")
    return Result(data, text), 0 if readiness.ready else 1


if __name__ == "__main__":
    sys.exit(main())
