"""The load script against the real app on a loopback socket: counts, swaps, JSON, table, PNG.

The app runs in-process under uvicorn (a thread, port 0) with the tiny backbone of `tiny_runs`
and its exported tasks; the load script talks to it over real HTTP, as it would in production.
The server's own request counter checks that every request made is counted, and no other.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import threading
import time

import httpx
import pytest
import uvicorn
from PIL import Image

import lpi
from clients import load
from export.tasks import export_run
from server.app import create_app
from server.settings import Settings


@pytest.fixture(scope="module")
def inbox(tiny_runs, tmp_path_factory):
    """Two versions of one task: the LPI run's and the dense run's first task."""
    backbone = lpi.load_backbone(tiny_runs / "backbone.safetensors")
    folder = tmp_path_factory.mktemp("inbox")
    first = export_run(tiny_runs / "lpi", backbone, folder / "lpi")[0]
    second = export_run(tiny_runs / "dense", backbone, folder / "dense")[0]
    assert first.task_id == second.task_id and first.prompt_version != second.prompt_version
    return folder, first, second


@pytest.fixture
def server(tiny_runs, inbox, tmp_path):
    """The app on 127.0.0.1:<free port> in a thread; yields (url, task, versions)."""
    folder, first, second = inbox
    settings = Settings(
        backbone=str(tiny_runs / "backbone.safetensors"),
        data_dir=tmp_path / "data",
        artifact_dir=folder,
        store="memory",
        threads=1,
    )
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}"
    task = first.task_id
    answer = httpx.put(f"{url}/tasks/{task}", json={"path": f"lpi/{first.path.name}"})
    assert answer.status_code == 200, answer.text
    try:
        yield url, task, (first, second)
    finally:
        uv.should_exit = True
        thread.join(10)


def served_embeds(url: str) -> int:
    """POST /embed requests the server has answered, by its own /metrics.

    The middleware counts a request just after its last byte is sent: read until two reads
    agree, so a count still being written is not missed.
    """
    counts = [-1]
    while True:
        text = httpx.get(f"{url}/metrics").text
        found = re.findall(r'^lpi_requests_total\{route="/embed",[^}]*\} ([0-9.]+)$', text, re.M)
        counts.append(int(sum(float(c) for c in found)))
        if counts[-1] == counts[-2]:
            return counts[-1]
        time.sleep(0.02)


def test_requests_made_are_counted_with_one_swap_and_outputs_written(server, tmp_path):
    url, task, (first, second) = server
    before = served_embeds(url)
    config = load.LoadConfig(
        url=url,
        modality="mixed",
        items_per_request=2,
        concurrency=(2,),
        duration_s=1.0,
        # One swap: the second would need the level to run 0.5 s (plus the first swap's time)
        # past its deadline, finishing requests in flight; 0.6 s left a loaded CI machine 0.2 s.
        swap_interval_s=0.75,
        warmup=0,
        swap_artifacts=(f"dense/{second.path.name}", f"lpi/{first.path.name}"),
    )
    record = asyncio.run(load.run(config))
    report = load.summarise(record)
    paths = load.write_report(report, tmp_path / "out")
    table = load.format_table(load.table_rows(report))

    (level,) = report["levels"]
    assert level["requests"] == len(record.samples) == served_embeds(url) - before > 0
    assert level["errors"] == {} and level["ok"] == level["requests"]
    assert level["items"] == 2 * level["requests"]
    assert (
        0 < level["latency_ms"]["p50"] <= level["latency_ms"]["p99"] <= level["latency_ms"]["max"]
    )
    assert level["requests_per_s"] == pytest.approx(level["requests"] / level["seconds"])
    assert level["server"]["batches"] >= 1 and level["server"]["mean_batch_rows"] >= 1

    (swap,) = report["swaps"]  # the one at 0.75 s; the next would come after the run
    assert swap["error"] is None and swap["changed"] and swap["version"] == second.prompt_version
    assert swap["previous"] == first.prompt_version and level["swaps"]["count"] == 1
    assert report["versions_seen"][task] == sorted([first.prompt_version, second.prompt_version])
    assert report["stale_versions"] == 0 and report["versions_checked"] > 0
    served = {s.version for s in record.samples}
    assert served <= {first.prompt_version, second.prompt_version}

    saved = json.loads(paths["json"].read_text())
    assert (
        saved["levels"][0]["requests"] == level["requests"] and saved["config"]["api_key"] is None
    )
    assert len(saved["samples"]) == level["requests"]
    with Image.open(paths["png"]) as image:
        assert image.format == "PNG" and image.size == (1200, 650)  # matplotlib, 12 x 6.5 in
    umask = os.umask(0)
    os.umask(umask)
    for path in paths.values():  # ordinary permissions, not tempfile's 0600
        assert stat.S_IMODE(path.stat().st_mode) == 0o644 & ~umask
    # The task is back on its starting version: the never-swapped artifact made it again.
    assert [w.version for w in record.restores] == [first.prompt_version]
    now = httpx.get(f"{url}/tasks/{task}").json()
    assert now["prompt_version"] == first.prompt_version and saved["restores"][0]["changed"]
    header, _, row = table.splitlines()
    assert "p95 ms" in header and row.split()[:2] == ["2", str(level["requests"])]


def test_a_request_count_bounds_each_level(server):
    url, _, _ = server
    before = served_embeds(url)
    config = load.LoadConfig(url=url, concurrency=(1, 3), requests=7, warmup=1)
    report = load.summarise(asyncio.run(load.run(config)))
    assert [level["requests"] for level in report["levels"]] == [7, 7]
    assert served_embeds(url) - before == 7 + 7 + 1 + 1  # and one warm-up request per level
    assert all(level["errors"] == {} for level in report["levels"])


def test_version_checks_catch_unknown_and_stale_versions():
    """Answers are judged against the swap timeline: before, during and after a swap."""
    info = {"task": "t", "prompt_version": "a", "serving_version": "a", "loaded_versions": ["a"]}
    record = load.Run(load.LoadConfig(requests=1), {"t": info})
    record.learn(info)
    record.known["t"].add("b")  # what the swap's answer taught
    record.swaps.append(load.Swap(1, "t", "b.safetensors", 1.0, 1.1, version="b", changed=True))

    def embed(start: float, end: float, version: str) -> load.Sample:
        return load.Sample(1, "embed", "t", 1, start, end, version=version)

    record.samples = [
        embed(0.1, 0.2, "a"),  # before the swap: fine
        embed(0.1, 0.2, "b"),  # before the swap began, yet the new version: stale
        embed(1.05, 1.2, "a"),  # overlaps the swap: either version is fine
        embed(1.2, 1.3, "b"),  # after: fine
        embed(1.2, 1.3, "a"),  # after the swap answered, the old version: stale
        embed(1.2, 1.3, "zzz"),  # never loaded: an error
    ]
    assert load.check_versions(record) == (2, 4)
    assert [s.error for s in record.samples] == [None] * 5 + ["version"]


def test_a_run_without_bounds_lasts_the_documented_default(monkeypatch, tmp_path):
    config = load.LoadConfig().check()
    assert config.level_seconds == load.DEFAULT_DURATION_S == 10.0
    assert load.LoadConfig(requests=5).check().level_seconds is None
    config, _ = load.parse_args(["--concurrency", "2"])
    assert config.level_seconds == 10.0
    # Without matplotlib the JSON is written and the PNG is left out, with a log line.
    monkeypatch.setattr("clients.load.plot.have_matplotlib", lambda: False)
    report = {"samples": [], "swaps": [], "sample_fields": []}
    paths = load.write_report(report, tmp_path)
    assert paths["png"] is None and json.loads(paths["json"].read_text()) == report


def test_unbounded_or_contradictory_runs_are_refused():
    with pytest.raises(ValueError, match="not both"):
        load.LoadConfig(duration_s=1, requests=1).check()
    with pytest.raises(ValueError, match="duration"):
        load.LoadConfig(duration_s=load.MAX_DURATION_S + 1).check()
    with pytest.raises(ValueError, match="swap"):
        load.LoadConfig(requests=1, swap_interval_s=0.5).check()
    with pytest.raises(ValueError, match="distinct"):
        load.LoadConfig(requests=1, concurrency=(2, 2)).check()
    assert load.parse_op("embed=3,search=1") == {"embed": 3.0, "search": 1.0}
    with pytest.raises(ValueError):
        load.parse_op("embed=3,delete=1")


def test_help_runs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load.parse_args(["--help"])
    assert exit_info.value.code == 0 and "--swap-artifacts" in capsys.readouterr().out
