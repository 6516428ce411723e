"""The `lpi` command line for people and for scripts: tables and summaries (`-o table`, the
default on a terminal), JSON (the default when piped) and JSON lines, one-line errors, the
newest version promoted when none is named, and the points commands; against the real app."""

from __future__ import annotations

import functools
import io
import json
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from anyio.from_thread import start_blocking_portal

import clients
import lpi
import wire
from clients import AsyncClient, Client, text_item
from clients.cli import main
from clients.output import Result, default_format, emit, error_line
from clients.tables import age, short_payload, table
from export.tasks import export_run
from server.app import create_app
from server.settings import Settings
from tests.client_twins import PortalTransport

ADMIN = "admin-key"


@pytest.fixture(scope="module")
def served(tiny_runs, tmp_path_factory):
    backbone = lpi.load_backbone(tiny_runs / "backbone.safetensors")
    inbox = tmp_path_factory.mktemp("inbox")
    artifacts = {
        a.task_id: a.path.relative_to(inbox).as_posix()
        for a in export_run(tiny_runs / "lpi", backbone, inbox)
    }
    settings = Settings(
        backbone=str(tiny_runs / "backbone.safetensors"),
        data_dir=tmp_path_factory.mktemp("d"),
        artifact_dir=inbox,
        store="memory",
        admin_key=ADMIN,
    )
    app = create_app(settings)
    with start_blocking_portal() as portal:  # noqa: SIM117 (the portal opens the lifespan)
        with portal.wrap_async_context_manager(app.router.lifespan_context(app)):
            yield app, portal, artifacts


@pytest.fixture
def lpi_cli(served, capsys):
    """lpi_cli(*argv) -> (exit status, stdout text, stderr text)."""
    app, portal, _ = served

    def run(*argv: str):
        code = main(["--admin-key", ADMIN, *argv], transport=PortalTransport(app, portal))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _loaded(lpi_cli, served) -> str:
    task = f"t-{uuid.uuid4().hex[:8]}"
    path = next(iter(served[2].values()))
    assert lpi_cli("tasks", "load", task, "--server-path", path)[0] == 0
    return task


def test_tasks_list_table_and_json(lpi_cli, served):
    task = _loaded(lpi_cli, served)
    code, out, _ = lpi_cli("-o", "table", "tasks", "list")
    header, rule, *rows = out.splitlines()
    assert code == 0 and header.split() == [
        "task",
        "version",
        "serving",
        "loaded",
        "vectors",
        "made",  # made by: the engine/dtype of the vectors ("-": none yet)
        "by",
        "method",
        "loaded",
        "at",
    ]
    assert set(rule) <= {"-", " "}
    row = next(r for r in rows if r.startswith(task))
    assert row.rstrip().endswith("just now") and " 0 " in row  # vectors, age in words
    code, out, _ = lpi_cli("tasks", "list")  # piped: JSON by default
    assert task in [t["task"] for t in json.loads(out)["tasks"]]
    code, out, _ = lpi_cli("-o", "jsonl", "tasks", "list")
    assert task in [json.loads(line)["task"] for line in out.splitlines()]


def test_embed_summarises_unless_asked_for_json(lpi_cli, served):
    task = _loaded(lpi_cli, served)
    code, out, _ = lpi_cli("-o", "table", "embed", "--task", task, "--text", "a", "--text", "b")
    assert code == 0 and out.count("\n") == 1 and "[" not in out
    assert "2 embeddings (2 text, 0 image) of dimension" in out and f"task {task}" in out
    dim = int(out.split("dimension ")[1].split()[0])
    code, out, _ = lpi_cli("-o", "json", "embed", "--task", task, "--text", "a")
    assert len(json.loads(out)["text_embeddings"][0]) == dim
    code, out, _ = lpi_cli("-o", "jsonl", "embed", "--text", "a", "--text", "b")
    assert [len(json.loads(line)) for line in out.splitlines()] == [dim, dim]


def test_promote_takes_the_newest_version_and_search_prints_a_table(lpi_cli, served):
    task = _loaded(lpi_cli, served)
    other = list(served[2].values())[1]
    code, out, _ = lpi_cli("-o", "json", "tasks", "load", task, "--server-path", other)
    newest = json.loads(out)["task"]["prompt_version"]
    code, out, err = lpi_cli("-o", "table", "tasks", "promote", task, "--force")
    assert code == 0, err
    assert out.strip() == f"{task}: version {newest} serves /search (0 vectors)"
    items = [
        {"id": f"p{i}", "text": f"item number {i}", "payload": {"n": i, "even": i % 2 == 0}}
        for i in range(6)
    ]
    code, out, err = lpi_cli(
        "-o", "json", "index", "--task", task, "--no-progress", _jsonl(served, items)
    )
    assert code == 0 and json.loads(out)["serving"], err
    code, out, _ = lpi_cli(
        "-o", "table", "search", "--task", task, "--text", "item number 3", "--top-k", "3"
    )
    lines = out.splitlines()
    assert lines[0].split() == ["#", "id", "score", "payload"]
    assert lines[2].split()[:2] == ["1", "p3"] and '"n": 3' in lines[2]
    assert float(lines[2].split()[2]) > 0.999 and len(lines) == 6
    code, out, _ = lpi_cli("-o", "jsonl", "search", "--task", task, "--text", "x", "--top-k", "2")
    assert [set(json.loads(line)) for line in out.splitlines()] == [{"id", "score", "payload"}] * 2

    # points: count, list (paged), delete by id and by filter
    assert lpi_cli("-o", "table", "points", "count", task)[1].strip() == f"6 points in {task}"
    code, out, _ = lpi_cli("points", "count", task, "--filter", "even=true")
    assert json.loads(out)["count"] == 3
    code, out, _ = lpi_cli("-o", "table", "points", "list", task, "--limit", "4")
    assert "more: lpi points list" in out and len(out.splitlines()) == 7
    code, out, _ = lpi_cli("points", "list", task, "--all")
    assert sorted(p["id"] for p in json.loads(out)["points"]) == [f"p{i}" for i in range(6)]
    code, out, _ = lpi_cli("-o", "table", "points", "delete", task, "--id", "p0", "--id", "p1")
    assert out.strip() == f"deleted 2 points from {task}"
    code, out, _ = lpi_cli("points", "delete", task, "--filter", "even=true")
    assert json.loads(out) == {"task": task, "deleted": 2}
    code, _, err = lpi_cli("points", "delete", task)
    assert code == 1 and err.count("\n") == 1 and "give --id" in err


def _jsonl(served, items) -> str:
    path = served[0].state.settings.data_dir / f"items-{uuid.uuid4().hex[:6]}.jsonl"
    path.write_text("\n".join(json.dumps(item) for item in items) + "\n")
    return str(path)


def test_errors_are_one_line_without_pydantic_links(lpi_cli):
    code, out, err = lpi_cli("tasks", "get", "nope")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("lpi: 404 unknown_task:") and "(field: task)" in err
    code, out, err = lpi_cli("search", "--task", "Bad Name!", "--text", "x")
    assert code == 1 and err.count("\n") == 1 and "http" not in err and "task" in err
    code, _, err = lpi_cli("-o", "table", "tasks", "promote", "nope")
    assert code == 1 and err.startswith("lpi: 404 unknown_task")


def test_output_helpers():
    assert age(1000.0, now=1000.0 + 3 * 86400 + 5) == "3 days ago"
    assert age(1000.0, now=1000.0 + 61) == "1 minute ago" and age(5.0, now=8.0) == "just now"
    text = table(("id", "score"), [("a", 0.5), ("bb", 0.25)], width=80)
    assert text.splitlines() == ["id  score", "--  ------", "a   0.5000", "bb  0.2500"]
    narrow = table(("payload",), [("x" * 200,)], width=40)
    assert max(map(len, narrow.splitlines())) <= 40 and narrow.endswith("…")
    assert (
        short_payload({"thumbnail": "data:" + "A" * 999, "k": 1}) == '{"thumbnail": '
        '"<thumbnail>", "k": 1}'
    )

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert default_format(Tty()) == "table" and default_format(io.StringIO()) == "json"
    out = io.StringIO()
    emit(Result({"a": [1, 2]}, "people", [1, 2]), "jsonl", out)
    assert out.getvalue() == "1\n2\n"
    assert error_line(ValueError("two\nlines")) == "two lines"


@pytest.mark.parametrize("twin", ["sync", "async"])
def test_sdk_points_and_numpy_results(served, twin):
    """Count, page through and delete stored points; embeddings as float32 arrays; typed."""
    app, portal, artifacts = served
    if twin == "sync":
        client = Client("http://lpi.test", admin_key=ADMIN, transport=PortalTransport(app, portal))
        call = lambda method, *a, **k: getattr(client, method)(*a, **k)  # noqa: E731
    else:
        client = AsyncClient("http://lpi.test", admin_key=ADMIN, transport=httpx.ASGITransport(app))
        call = lambda method, *a, **k: portal.call(  # noqa: E731
            functools.partial(getattr(client, method), *a, **k)
        )
    task = f"t-{uuid.uuid4().hex[:8]}"
    call("load_task", task, server_path=next(iter(artifacts.values())))
    items = [text_item(f"note {i}", id=f"n{i}", payload={"even": i % 2 == 0}) for i in range(7)]
    call("index", task, items)
    assert call("count_points", task) == 7 and call("count_points", task, {"even": True}) == 4
    page = call("list_points", task, limit=3)
    assert len(page.points) == 3 and page.next_offset is not None
    assert sorted(p.id for p in call("all_points", task, page_size=2)) == [
        f"n{i}" for i in range(7)
    ]
    assert call("delete_points", task, ids=["n0", "n1", "absent"]) == 2
    assert call("delete_points", task, filter={"even": True}) == 3  # n2, n4, n6
    assert sorted(p.id for p in call("all_points", task)) == ["n3", "n5"]
    with pytest.raises(ValueError, match="exactly one"):
        call("delete_points", task)
    arrays = call("embed_texts", ["a", "b", "c"], task, numpy=True, chunk_size=2)
    listed = call("embed_texts", ["a", "b", "c"], task).text_embeddings
    assert isinstance(arrays, np.ndarray) and arrays.dtype == np.float32
    assert arrays.shape == (3, len(listed[0]))
    assert np.allclose(arrays, np.asarray(listed), atol=1e-6)  # float32 rounding of the same
    assert (Path(clients.__file__).parent / "py.typed").is_file()
    assert (Path(wire.__file__).parent / "py.typed").is_file()
    if twin == "sync":
        client.close()
    else:
        portal.call(client.close)
