"""One bad task never stops the server: it is skipped with its reason, the others serve.

A real `python -m server` process restarts over a data directory where one task's kept
artifact is corrupt and another's no longer fits the engine (a lower --pool-rank than its
folded rank): it starts, serves the good tasks, lists the bad ones with their reasons in
GET /tasks and /readyz, and an admin's load of a fitting version clears the failure. The
demo's start-up loads skip a task the engine refuses the same way (in process).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

import lpi
from export import write_artifact
from server.app import _serve_demo
from server.engine import build_engine
from server.registry import TaskRegistry
from server.store.qdrant import QdrantStore
from server.testing import ServerProcess
from tests.conftest import random_prompts

GOOD = ("alpha", "beta")  # no interaction: folded rank R' = 4
TOO_WIDE = "gamma"  # with the interaction: R' = 8, more than the restart's --pool-rank 4
CORRUPT = "delta"  # its kept copy is damaged between the two runs


def _artifact(folder: Path, backbone, name: str, seed: int, interaction: bool) -> Path:
    prompts = random_prompts(backbone, seed, interaction=interaction, layers=3, tokens=8)
    path = folder / f"{name}-{seed}.safetensors"
    write_artifact(path, name, lpi.fold_task(backbone, prompts), backbone)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A backbone file and one artifact per task (plus a fitting replacement for gamma)."""
    root = tmp_path_factory.mktemp("bad-tasks")
    backbone = lpi.load_backbone("tiny", seed=0)
    lpi.save_backbone(backbone, root / "backbone.safetensors")
    artifacts = {name: _artifact(root, backbone, name, i, False) for i, name in enumerate(GOOD)}
    artifacts[CORRUPT] = _artifact(root, backbone, CORRUPT, 2, False)
    artifacts[TOO_WIDE] = _artifact(root, backbone, TOO_WIDE, 3, True)
    artifacts["fix"] = _artifact(root, backbone, TOO_WIDE, 4, False)
    return root, artifacts


def _serve(root: Path, data_dir: Path, *extra: str) -> ServerProcess:
    args = [
        "--backbone",
        str(root / "backbone.safetensors"),
        "--data-dir",
        str(data_dir),
        "--store",
        "memory",
        "--log-format",
        "json",
        *extra,
    ]
    return ServerProcess(args, log_path=data_dir.parent / "server.log", start_timeout_s=180)


def _embed(http: httpx.Client, task: str) -> httpx.Response:
    return http.post("/embed", json={"task": task, "texts": ["a red circle"]})


def test_a_bad_task_is_skipped_and_reported_and_the_others_serve(files, tmp_path):
    root, artifacts = files
    data_dir = tmp_path / "data"
    with _serve(root, data_dir) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        for name in (*GOOD, CORRUPT, TOO_WIDE):
            body = artifacts[name].read_bytes()
            put = http.put(
                f"/tasks/{name}", content=body, headers={"content-type": "application/octet-stream"}
            )
            assert put.status_code == 200, put.text
    registry = json.loads((data_dir / "registry" / "registry.json").read_text())
    [kept] = registry["tasks"][CORRUPT]["versions"].values()
    damaged = bytearray((data_dir / "registry" / kept).read_bytes())
    damaged[-8:] = bytes(8 * [0xFF])  # the tensors' bytes: the checksum no longer holds
    (data_dir / "registry" / kept).write_bytes(bytes(damaged))

    # Restart with a pool that holds rank 4 at most: gamma (R' = 8) no longer fits.
    with (
        _serve(root, data_dir, "--pool-rank", "4") as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
    ):
        listed = http.get("/tasks").json()
        assert sorted(t["task"] for t in listed["tasks"]) == sorted(GOOD)
        failed = {f["task"]: f for f in listed["failed"]}
        assert sorted(failed) == sorted([CORRUPT, TOO_WIDE])
        assert all(f["status"] == "failed" and f["version"] for f in failed.values())
        assert "checksum" in failed[CORRUPT]["error"]
        assert "rank" in failed[TOO_WIDE]["error"] and "pool" in failed[TOO_WIDE]["error"]
        ready = http.get("/readyz")
        assert ready.status_code == 200, ready.text  # the good tasks serve: ready
        assert {f["task"] for f in ready.json()["failed"]} == {CORRUPT, TOO_WIDE}
        assert any(TOO_WIDE in reason for reason in ready.json()["reasons"])
        for name in GOOD:
            assert _embed(http, name).status_code == 200
        assert _embed(http, TOO_WIDE).status_code == 404

        # An admin fixes gamma by loading a version that fits: the failure is gone.
        put = http.put(
            f"/tasks/{TOO_WIDE}",
            content=artifacts["fix"].read_bytes(),
            headers={"content-type": "application/octet-stream"},
        )
        assert put.status_code == 200, put.text
        assert _embed(http, TOO_WIDE).status_code == 200
        assert [f["task"] for f in http.get("/tasks").json()["failed"]] == [CORRUPT]
        assert [f["task"] for f in http.get("/readyz").json()["failed"]] == [CORRUPT]
    log = (tmp_path / "server.log").read_text()
    assert f"task {CORRUPT} version" in log and f"task {TOO_WIDE} version" in log


def test_a_demo_task_the_engine_refuses_is_skipped(files, tmp_path):
    """The demo's start-up loads: a task that does not fit is recorded, the next one loads."""
    root, artifacts = files
    backbone = lpi.load_backbone(str(root / "backbone.safetensors"))
    engine = build_engine("torch", backbone, max_rank=4)
    store = QdrantStore(location=":memory:")
    registry = TaskRegistry(engine, store, tmp_path / "registry", backbone)
    try:
        demo = SimpleNamespace(
            # alpha first: the pool takes its rank (4), then gamma (8) does not fit, and beta
            # after it still loads
            artifacts={n: artifacts[n] for n in ("alpha", TOO_WIDE, "beta")},
            items={},
        )
        service = SimpleNamespace(
            registry=registry, store=store, limits=SimpleNamespace(max_items=8)
        )
        asyncio.run(_serve_demo(service, demo))
        assert registry.names() == ["alpha", "beta"]
        [failure] = registry.failures()
        assert failure["task"] == TOO_WIDE and "rank" in failure["error"]
    finally:
        registry.close()
        store.close()
