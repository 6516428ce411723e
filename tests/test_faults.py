"""Faults with a real server process: SIGKILL while indexing, while loading.

Each test runs `python -m server` as a subprocess on a free loopback port with the tiny backbone
and the tiny runs' artifacts, kills it with SIGKILL at a bad moment, restarts it on the same data
directory and checks what came back:

- indexing: every id whose /index request was acknowledged (HTTP 200) is stored, with its
  payload intact and a usable vector (a search by its own text scores ~1.0); ids of requests cut
  off by the kill may be there or not, but never torn. Local mode and, if installed, Qdrant Edge.
- loading: the task serves one whole version, the old or the new (its /embed vectors are the
  ones that version computes), registry.json parses, and every artifact the registry keeps
  reads back completely; a later load of the new version succeeds; loads that fail validation
  (corrupt bytes, another backbone) leave it serving.

Two faults are replayed in-process from the disk state a kill leaves: a kill inside a load
with promote (the store serves a version registry.json does not name: restart restores it), and
uploads a killed process left behind (restart removes them).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import random
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

import lpi
from export import read_artifact, write_artifact
from lpi.atomic import TEMP_GLOB
from server.testing import ServerProcess
from tests.server_helpers import (
    cosines,
    create_app,
    reference_features,
    run,
    running,
    settings,
)

TASK = "t"
TEXTS = ["a red square", "two small blue circles"]
MIN_COSINE = 0.9999  # same fp32 math as the direct call; only summation order differs
SCORE_TOLERANCE = 1e-4  # a stored vector against the same text embedded again: cosine 1
BATCH, SENDERS, KILL_AFTER = 4, 2, 25  # items per /index, client threads, acks before the kill


# `artifacts` (inbox, files) and `backbone`: tests/app_fixtures.py.


@pytest.fixture
def launch(tiny_runs, artifacts, tmp_path):
    """start(data_dir, store) -> a ready server; every one started is killed at teardown."""
    inbox, _ = artifacts
    started: list[ServerProcess] = []

    def start(data_dir: Path, store: str = "local") -> ServerProcess:
        argv = [
            "--backbone",
            str(tiny_runs / "backbone.safetensors"),
            "--data-dir",
            str(data_dir),
            "--artifact-dir",
            str(inbox),
            "--store",
            store,
            "--threads",
            "1",
            "--max-wait-ms",
            "2",
            "--log-level",
            "warning",
        ]
        server = ServerProcess(argv, log_path=tmp_path / "server.log")
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            server.kill()


def load_path(url: str, path: Path, inbox: Path) -> dict:
    answer = httpx.put(
        f"{url}/tasks/{TASK}", json={"path": str(path.relative_to(inbox))}, timeout=60
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["task"]


# -- SIGKILL while indexing ---------------------------------------------------------------------


def item_text(n: int, i: int) -> str:
    return f"item {i} of batch {n}: a {('red', 'green', 'blue', 'grey')[i % 4]} shape"


def batch_items(n: int) -> list[dict]:
    return [
        {"id": f"b{n}-{i}", "text": item_text(n, i), "payload": {"batch": n, "i": i}}
        for i in range(BATCH)
    ]


def index_until_killed(server: ServerProcess) -> tuple[set[int], set[int], list]:
    """SENDERS threads send /index batches; SIGKILL once KILL_AFTER were acknowledged.

    Returns the batch numbers sent, those acknowledged (200 with the batch's ids), and every
    status received ("<status>: wrong" for a 200 that named other ids).
    """
    numbers, lock, stop = itertools.count(), threading.Lock(), threading.Event()
    sent: set[int] = set()
    acked: set[int] = set()
    statuses: list = []

    def sender() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while not stop.is_set():
                with lock:
                    n = next(numbers)
                    sent.add(n)
                try:
                    answer = client.post("/index", json={"task": TASK, "items": batch_items(n)})
                except httpx.TransportError:  # the kill cut this request off
                    return
                ok = answer.status_code == 200 and answer.json()["ids"] == [
                    item["id"] for item in batch_items(n)
                ]
                with lock:  # asserted by the caller: a failed assert here would only end the thread
                    statuses.append(answer.status_code if ok else f"{answer.status_code}: wrong")
                    if ok:
                        acked.add(n)

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(SENDERS)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(acked) < KILL_AFTER and time.monotonic() < deadline:
        if not any(thread.is_alive() for thread in threads):
            break
        time.sleep(0.002)
    server.kill()  # while the senders still send
    stop.set()
    for thread in threads:
        thread.join(30)
    return sent, acked, statuses


def stores() -> list:
    edge = pytest.mark.skipif(
        importlib.util.find_spec("qdrant_edge") is None,
        reason="qdrant-edge-py is not installed (the `edge` extra); store=edge cannot start",
    )
    return ["local", pytest.param("edge", marks=edge)]


@pytest.mark.parametrize("store", stores())
def test_acknowledged_index_writes_survive_sigkill(store, launch, artifacts, tmp_path):
    inbox, files = artifacts
    data = tmp_path / "data"
    server = launch(data, store)
    version = load_path(server.url, files["lpi"][1], inbox)["prompt_version"]
    sent, acked, statuses = index_until_killed(server)
    assert len(acked) >= KILL_AFTER, server.log_tail()
    assert set(statuses) == {200}, statuses

    server = launch(data, store)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        info = client.get(f"/tasks/{TASK}").json()
        assert info["prompt_version"] == info["serving_version"] == version
        assert len(acked) * BATCH <= info["vectors"] <= len(sent) * BATCH
        found = 0
        for n in sorted(sent):
            want = {item["id"]: item for item in batch_items(n)}
            hits = search(client, item_text(n, 0), {"batch": n}, top_k=2 * BATCH)["hits"]
            ids = {hit["id"] for hit in hits}
            if n in acked:
                assert ids == set(want), f"batch {n} was acknowledged; stored: {sorted(ids)}"
            assert ids <= set(want), f"batch {n}: unknown ids {sorted(ids - set(want))}"
            for hit in hits:  # acknowledged or not, nothing stored is torn
                assert hit["payload"] == want[hit["id"]]["payload"]
                i = hit["payload"]["i"]
                own = search(client, item_text(n, i), {"batch": n, "i": i}, top_k=2)
                assert [h["id"] for h in own["hits"]] == [hit["id"]]
                assert own["hits"][0]["score"] == pytest.approx(1.0, abs=SCORE_TOLERANCE)
            found += len(hits)
        assert found == info["vectors"]  # every stored point belongs to a batch sent


def search(client: httpx.Client, text: str, filter: dict, top_k: int) -> dict:
    body = {"task": TASK, "query": {"text": text}, "filter": filter, "top_k": top_k}
    answer = client.post("/search", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


# -- SIGKILL while loading a task ---------------------------------------------------------------


def send_upload(server: ServerProcess, body: bytes) -> socket.socket:
    """PUT /tasks/TASK with the artifact's bytes, written whole into the socket; no reply read."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    head = (
        f"PUT /tasks/{TASK} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def kill_during_load(server: ServerProcess, data: Path, target: Path, trigger: str, delay: float):
    """Upload `target`, then SIGKILL after `delay` s ("delay"), or as soon as the registry's copy
    of the artifact appears ("copied": between the copy and registry.json, mid-load)."""
    version = read_artifact(target).prompt_version
    copy = data / "registry" / "artifacts" / TASK / f"{version}.safetensors"
    assert trigger == "delay" or not copy.exists()
    sock = send_upload(server, target.read_bytes())
    try:
        if trigger == "copied":
            deadline = time.monotonic() + 30
            while not copy.exists():
                assert time.monotonic() < deadline, "the upload never reached the copy"
                time.sleep(0.0005)
        else:
            time.sleep(delay)
        server.kill()
    finally:
        sock.close()


def check_state_dir(data: Path, versions: set[str]) -> None:
    """registry.json parses and names whole artifacts; every kept artifact reads back.

    Temp files (`lpi.atomic.TEMP_GLOB`) may be left by the kill; registry.json never names them.
    """
    state_dir = data / "registry"
    state = json.loads((state_dir / "registry.json").read_text())
    assert state["format"] == 1
    for entry in state["tasks"].values():
        assert entry["active"] in entry["versions"]
        for version, relative in entry["versions"].items():
            assert version in versions and not Path(relative).match(TEMP_GLOB)
            assert read_artifact(state_dir / relative).prompt_version == version
    for path in (state_dir / "artifacts").rglob("*"):
        if path.is_file() and not path.match(TEMP_GLOB):
            assert read_artifact(path).prompt_version == path.stem, path


def check_serves_whole_version(server: ServerProcess, by_version: dict, backbone) -> str:
    """The task serves one version of `by_version` completely; returns it."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        ready = client.get("/readyz").json()
        assert ready["reasons"] == [], ready  # nothing failed to restore
        info = client.get(f"/tasks/{TASK}").json()
        assert set(info["loaded_versions"]) <= set(by_version), info
        assert info["serving_version"] in info["loaded_versions"], info
        embed = client.post("/embed", json={"task": TASK, "texts": TEXTS}).json()
        assert embed["prompt_version"] == info["prompt_version"]
        want = reference_features(backbone, by_version[info["prompt_version"]], TEXTS)["text"]
        assert cosines(embed["text_embeddings"], want).min() >= MIN_COSINE
        found = search(client, TEXTS[0], {"probe": True}, top_k=1)  # indexed before the kills
        assert [h["id"] for h in found["hits"]] == ["probe"]
        assert found["hits"][0]["score"] == pytest.approx(1.0, abs=SCORE_TOLERANCE)
        return info["prompt_version"]


def test_sigkill_during_a_task_load_leaves_a_whole_version(launch, artifacts, backbone, tmp_path):
    inbox, files = artifacts
    old_file, new_file = files["lpi"][1], files["dense"][1]
    by_version = {read_artifact(p).prompt_version: p for p in (old_file, new_file)}
    other = {old_file: new_file, new_file: old_file}
    data = tmp_path / "data"
    server = launch(data)
    version = load_path(server.url, old_file, inbox)["prompt_version"]
    probe = {"id": "probe", "text": TEXTS[0], "payload": {"probe": True}}
    answer = httpx.post(f"{server.url}/index", json={"task": TASK, "items": [probe]}, timeout=60)
    assert answer.status_code == 200, answer.text

    # The first kill lands mid-load (the new version's copy exists, registry.json is not yet
    # rewritten); the second at a random delay within a load's time (~0.1 s) after the upload.
    rounds = [("copied", 0.0), ("delay", random.Random(8).uniform(0.0, 0.1))]
    for trigger, delay in rounds:
        kill_during_load(server, data, other[by_version[version]], trigger, delay)
        check_state_dir(data, set(by_version))
        server = launch(data)
        version = check_serves_whole_version(server, by_version, backbone)

    # Whatever the kills left behind, loading the other version now works...
    target = other[by_version[version]]
    answer = httpx.put(
        f"{server.url}/tasks/{TASK}",
        content=target.read_bytes(),
        timeout=60,
        headers={"content-type": "application/octet-stream"},
    )
    assert answer.status_code == 200, answer.text
    assert check_serves_whole_version(server, by_version, backbone) != version
    version = answer.json()["task"]["prompt_version"]
    # ... and loads that fail validation leave it serving.
    corrupt = bytearray(target.read_bytes())
    corrupt[-20] ^= 0xFF
    foreign = other_backbone_artifact(target, tmp_path / "foreign.safetensors")
    for body, why in ((bytes(corrupt), "checksum"), (foreign.read_bytes(), "backbone")):
        answer = httpx.put(
            f"{server.url}/tasks/{TASK}",
            content=body,
            timeout=60,
            headers={"content-type": "application/octet-stream"},
        )
        assert answer.status_code == 422 and answer.json()["error"]["field"] == "artifact"
        assert why in answer.json()["error"]["message"], answer.text
    assert check_serves_whole_version(server, by_version, backbone) == version
    check_state_dir(data, set(by_version))


def other_backbone_artifact(source: Path, out: Path) -> Path:
    """The same prompts, written for another tiny backbone (same widths, other weights)."""
    artifact = read_artifact(source)
    other = lpi.load_backbone("tiny", seed=11)
    write_artifact(out, artifact.name, artifact.folded, other, keys=artifact.keys)
    return out


# -- a crash inside a load with promote (in-process: the disk state it leaves) --------------------


def test_a_kill_between_store_promote_and_registry_write_keeps_search(
    tiny_runs, artifacts, tmp_path
):
    """Replays the disk state of a SIGKILL after `store.promote` and before `_save_state`.

    Every write before the kill is complete (the artifact copy, the store's alias) and
    registry.json is the one from before the load: restore it over the finished load's.
    """
    inbox, files = artifacts
    config = settings(tiny_runs, tmp_path / "data", inbox, store="local")
    state_file = tmp_path / "data" / "registry" / "registry.json"
    relative = lambda p: str(p.relative_to(inbox))  # noqa: E731
    item = {"id": "k", "text": TEXTS[0]}

    async def before() -> bytes:
        async with running(create_app(config)) as client:
            await client.put(f"/tasks/{TASK}", json={"path": relative(files["lpi"][1])})
            await client.post("/index", json={"task": TASK, "items": [item]})
            saved = state_file.read_bytes()
            body = {"path": relative(files["dense"][1]), "promote": True}
            assert (await client.put(f"/tasks/{TASK}", json=body)).status_code == 200
            await client.post("/index", json={"task": TASK, "items": [item]})
            return saved

    async def after():
        async with running(create_app(config)) as client:
            info = (await client.get(f"/tasks/{TASK}")).json()
            query = {"task": TASK, "query": {"text": TEXTS[0]}}
            return info, await client.post("/search", json=query)

    os.replace(write_bytes(tmp_path / "old-state.json", run(before())), state_file)
    info, answer = run(after())
    assert info["serving_version"] in info["loaded_versions"], info
    assert answer.status_code == 200, answer.text


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_restart_removes_uploads_a_killed_process_left(tiny_runs, artifacts, tmp_path):
    inbox, _ = artifacts
    config = settings(tiny_runs, tmp_path / "data", inbox)
    uploads = tmp_path / "data" / "registry" / "uploads"
    uploads.mkdir(parents=True)
    (uploads / "upload-cut-off.safetensors").write_bytes(b"half an artifact")
    kept = tmp_path / "data" / "registry" / "artifacts" / "t"
    kept.mkdir(parents=True)
    (kept / ".abc.safetensors.x1y2.tmp").write_bytes(b"half a copy")

    async def start() -> int:
        async with running(create_app(config)) as client:
            return (await client.get("/readyz")).status_code

    assert run(start()) == 200
    assert list(uploads.iterdir()) == [] and list(kept.iterdir()) == []
