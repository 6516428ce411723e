"""A hostile admin client against the real app (in-process): artifacts that lie must not load.

Each test is one class of attack, through PUT /tasks with the admin key and API key set: a
header field naming a file, a version label not tied to its content, task keys that break
task='auto', values that poison vectors, and artifact paths that fail to resolve. Vectors
are compared per row by cosine (>= 0.9999: the same float32 computation, batched otherwise).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import export.artifact
import lpi
from server.app import create_app
from server.engine import TorchEngine
from tests.artifact_edits import (
    ADMIN,
    OCTETS,
    QUERY,
    artifact_bytes,
    files_outside,
    is_unit_vector_list,
    read_raw,
    seal,
    write_raw,
)
from tests.server_helpers import cosines, export_artifacts, reference_features, run, running
from tests.server_helpers import settings as base_settings

TEXTS = ["a red square", "two blue circles"]
MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def exported(tiny_runs, tmp_path_factory):
    """Two real tasks: the first plays shapes-colours, the second textures."""
    return export_artifacts(tiny_runs, tmp_path_factory.mktemp("exported"))["lpi"]


@pytest.fixture(scope="module")
def backbone(tiny_runs):
    return lpi.load_backbone(tiny_runs / "backbone.safetensors")


@pytest.fixture
def dirs(tmp_path, exported):
    """root/data (the server's), root/inbox (its artifact directory, with both tasks)."""
    root = tmp_path / "root"
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    for name, path in zip(("shapes.safetensors", "textures.safetensors"), exported, strict=True):
        shutil.copyfile(path, inbox / name)
    return root, root / "data", inbox


def make_app(tiny_runs, dirs):
    _, data, inbox = dirs
    return create_app(
        base_settings(tiny_runs, data, inbox, admin_key="admin-secret", api_key="query-secret")
    )


async def put_bytes(client, task, body: bytes):
    return await client.put(f"/tasks/{task}", content=body, headers=ADMIN | OCTETS)


async def embed(client, task):
    return await client.post("/embed", json={"task": task, "texts": TEXTS}, headers=QUERY)


def refused(answer, status: int, field: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["field"] == field, answer.text


# -- 1. a header field never names a file -----------------------------------------------------


@pytest.mark.parametrize("label", ["../../../../newdir/sub/x", "ABSOLUTE", "v" * 300])
def test_a_header_version_never_names_a_file(tiny_runs, dirs, label):
    root, data, inbox = dirs
    label = str(root / "absolute" / "x") if label == "ABSOLUTE" else label
    meta, tensors = read_raw(inbox / "shapes.safetensors")
    hostile = artifact_bytes(meta | {"prompt_version": label}, tensors)  # checksum untouched
    data.mkdir()
    before = files_outside(root, data)

    async def scenario():
        async with running(make_app(tiny_runs, dirs)) as client:
            good = await client.put("/tasks/t", json={"path": "shapes.safetensors"}, headers=ADMIN)
            answer = await put_bytes(client, "t", hostile)
            return good.json(), answer, (await embed(client, "t")).json()

    good, answer, after = run(scenario())
    refused(answer, 422, "artifact.prompt_version")
    assert files_outside(root, data) == before, "nothing is written outside the data directory"
    assert not (root / "newdir").exists() and not (root / "absolute").exists()
    assert after["prompt_version"] == good["task"]["prompt_version"], "the old version serves"
    kept = sorted(p.name for p in (data / "registry" / "artifacts" / "t").iterdir())
    assert kept == [f"{good['task']['prompt_version']}.safetensors"]


# -- 2. a version label is its content's hash ---------------------------------------------------


def test_a_version_label_is_tied_to_its_content(tiny_runs, dirs, backbone):
    _, _, inbox = dirs
    shapes_meta, shapes = read_raw(inbox / "shapes.safetensors")
    textures_meta, _ = read_raw(inbox / "textures.safetensors")
    relabelled = artifact_bytes(
        shapes_meta | {"prompt_version": textures_meta["prompt_version"]}, shapes
    )

    async def scenario():
        async with running(make_app(tiny_runs, dirs)) as client:
            lie = await put_bytes(client, "t", relabelled)
            truth = await put_bytes(client, "t", (inbox / "textures.safetensors").read_bytes())
            return lie, truth, (await embed(client, "t")).json()

    lie, truth, answer = run(scenario())
    refused(lie, 422, "artifact.prompt_version")
    assert truth.status_code == 200 and truth.json()["changed"], truth.text
    assert answer["prompt_version"] == textures_meta["prompt_version"]
    textures = reference_features(backbone, inbox / "textures.safetensors", TEXTS)["text"]
    shapes_want = reference_features(backbone, inbox / "shapes.safetensors", TEXTS)["text"]
    assert (cosines(answer["text_embeddings"], textures) >= MIN_COSINE).all()
    assert (cosines(answer["text_embeddings"], shapes_want) < MIN_COSINE).any()


def test_two_contents_never_share_a_label(tiny_runs, dirs, monkeypatch):
    """A label collision (forced here with 1-digit versions; 16 digits can be collided with
    about 2**32 tries) must not swap other tensors in under a loaded version's name."""
    _, _, inbox = dirs
    monkeypatch.setattr(export.artifact, "VERSION_CHARS", 1)
    monkeypatch.setattr(export.artifact, "is_content_version", lambda text: len(text) == 1)
    meta, tensors = read_raw(inbox / "shapes.safetensors")
    first = seal(meta, tensors)
    for step in range(1, 200):  # train.* is not served: vary it until the label collides
        other = tensors | {"train.A": tensors["train.A"] + step * 1e-3}
        second = seal(meta, other)
        if second["prompt_version"] == first["prompt_version"]:
            break
    assert second["checksum"] != first["checksum"]

    async def scenario():
        async with running(make_app(tiny_runs, dirs)) as client:
            one = await put_bytes(client, "t", artifact_bytes(first, tensors))
            two = await put_bytes(client, "t", artifact_bytes(second, other))
            return one, two

    one, two = run(scenario())
    assert one.status_code == 200, one.text
    refused(two, 422, "artifact.prompt_version")
    assert "collision" in two.json()["error"]["message"]


# -- 4. task keys never break task='auto' -------------------------------------------------------


KEY_EDITS = {
    "wrong width": lambda t: t.update({"keys.image": t["keys.image"][:, :32].contiguous()}),
    "one dimension": lambda t: t.update({"keys.image": t["keys.image"][0].contiguous()}),
    "no centres": lambda t: t.update({"keys.text": t["keys.text"][:0].contiguous()}),
    "all zeros": lambda t: t.update({"keys.image": torch.zeros_like(t["keys.image"])}),
    "not unit-norm": lambda t: t.update({"keys.text": t["keys.text"] * 3}),
    "one modality": lambda t: t.pop("keys.text"),
    "integers": lambda t: t.update({"keys.image": t["keys.image"].round().long()}),
}


@pytest.mark.parametrize("edit", sorted(KEY_EDITS))
def test_malformed_task_keys_are_refused(tiny_runs, dirs, edit):
    _, _, inbox = dirs
    meta, tensors = read_raw(inbox / "shapes.safetensors")
    KEY_EDITS[edit](tensors)

    async def scenario():
        async with running(make_app(tiny_runs, dirs)) as client:
            bad = await put_bytes(client, "bad", artifact_bytes(seal(meta, tensors), tensors))
            good = await client.put(
                "/tasks/good", json={"path": "textures.safetensors"}, headers=ADMIN
            )
            return bad, good, await embed(client, "auto")

    bad, good, auto = run(scenario())
    assert bad.status_code == 422, bad.text
    assert bad.json()["error"]["field"].startswith("artifact.keys."), bad.text
    assert good.status_code == 200 and auto.status_code == 200, auto.text
    assert auto.json()["text_tasks"] == ["good", "good"]


def test_routing_skips_unusable_keys_stored_earlier(tiny_runs, dirs, monkeypatch):
    """Keys that got stored before these checks existed: routing leaves that task out, and a
    restart (checks on) refuses to restore it without stopping."""
    _, _, inbox = dirs
    meta, tensors = read_raw(inbox / "shapes.safetensors")
    tensors["keys.image"] = torch.zeros_like(tensors["keys.image"])

    async def older_server():
        monkeypatch.setattr(export.artifact, "check_keys", lambda *args: None)
        async with running(make_app(tiny_runs, dirs)) as client:
            bad = await put_bytes(client, "bad", artifact_bytes(seal(meta, tensors), tensors))
            await client.put("/tasks/good", json={"path": "textures.safetensors"}, headers=ADMIN)
            return bad, await embed(client, "auto")

    async def restarted():
        monkeypatch.undo()
        app = make_app(tiny_runs, dirs)
        async with running(app) as client:
            listed = await client.get("/tasks", headers=QUERY)
            return app.state.restore_failures, listed, await embed(client, "auto")

    bad, auto = run(older_server())
    assert bad.status_code == 200, "the check was off: it got stored"
    assert auto.status_code == 200 and auto.json()["text_tasks"] == ["good", "good"], auto.text
    failures, listed, auto = run(restarted())
    assert [f.split("@")[0] for f in failures] == ["bad"] and "keys.image" in failures[0]
    assert [t["task"] for t in listed.json()["tasks"]] == ["good"]
    assert auto.status_code == 200 and auto.json()["text_tasks"] == ["good", "good"], auto.text


# -- 7. values that would poison vectors ---------------------------------------------------------


def _scaled(t):
    t["text.value_m"] = t["text.value_m"] * 1e30  # finite, far beyond any trained value


VALUE_EDITS = {
    "value_m x 1e30": (_scaled, "artifact.text.value_m"),
    "rank 0": (
        lambda t: t.update({"image.key_u": t["image.key_u"].flatten()[0]}),
        "artifact.image.key_u",
    ),
    "int64": (
        lambda t: t.update({"text.value_m": t["text.value_m"].long()}),
        "artifact.text.value_m",
    ),
    "bool": (lambda t: t.update({"image.key_m": t["image.key_m"] > 0}), "artifact.image.key_m"),
    "unknown tensor": (lambda t: t.update({"image.extra": torch.ones(2)}), "artifact"),
}


@pytest.mark.parametrize("edit", sorted(VALUE_EDITS))
def test_poisoned_values_are_refused(tiny_runs, dirs, edit):
    _, _, inbox = dirs
    meta, tensors = read_raw(inbox / "shapes.safetensors")
    change, field = VALUE_EDITS[edit]
    change(tensors)

    async def scenario():
        async with running(make_app(tiny_runs, dirs)) as client:
            return await put_bytes(client, "t", artifact_bytes(seal(meta, tensors), tensors))

    refused(run(scenario()), 422, field)


def test_the_probe_batch_refuses_what_the_bounds_let_through(tiny_runs, dirs, monkeypatch):
    """With the value bound off, the engine's probe batch still sees the poison before the
    switch: 422 naming the artifact, the old version serving, no copy kept."""
    _, data, inbox = dirs
    monkeypatch.setattr(export.artifact, "check_prefix", lambda *args: None)
    meta, tensors = read_raw(inbox / "shapes.safetensors")
    _scaled(tensors)
    poisoned = artifact_bytes(seal(meta, tensors), tensors)

    async def scenario():
        async with running(make_app(tiny_runs, dirs)) as client:
            good = await client.put(
                "/tasks/t", json={"path": "textures.safetensors"}, headers=ADMIN
            )
            answer = await put_bytes(client, "t", poisoned)
            return good.json(), answer, await embed(client, "t")

    good, answer, after = run(scenario())
    refused(answer, 422, "artifact")
    assert "probe" in answer.json()["error"]["message"]
    version = good["task"]["prompt_version"]
    assert after.status_code == 200 and after.json()["prompt_version"] == version
    assert is_unit_vector_list(after.json()["text_embeddings"])
    kept = [p.name for p in (data / "registry" / "artifacts" / "t").iterdir()]
    assert kept == [f"{version}.safetensors"], "a refused version leaves no copy"


def test_a_non_finite_vector_is_never_served(tiny_runs, dirs, monkeypatch):
    """Whatever a loaded version computes, a NaN row is refused (4xx naming the task), never
    sent as null; /index stores nothing."""

    async def scenario():
        async with running(make_app(tiny_runs, dirs)) as client:
            await client.put("/tasks/t", json={"path": "shapes.safetensors"}, headers=ADMIN)
            run_once = TorchEngine._run

            def poisoned(self, modality, data, prefix):
                out = run_once(self, modality, data, prefix)
                return out if prefix is None else out * float("nan")

            monkeypatch.setattr(TorchEngine, "_run", poisoned)
            answer = await embed(client, "t")
            index = await client.post(
                "/index",
                headers=QUERY,
                json={"task": "t", "items": [{"id": "a", "text": "a red square"}]},
            )
            bare = await client.post("/embed", json={"texts": TEXTS}, headers=QUERY)
            monkeypatch.undo()
            info = await client.get("/tasks/t", headers=QUERY)
            return answer, index, bare, info.json()

    answer, index, bare, info = run(scenario())
    refused(answer, 422, "task")
    refused(index, 422, "task")
    assert "null" not in answer.text and info["vectors"] == 0
    assert bare.status_code == 200 and is_unit_vector_list(bare.json()["text_embeddings"])


# -- 8. artifact paths that cannot be resolved ---------------------------------------------------


def _loop(inbox):
    os.symlink(inbox / "loop-b", inbox / "loop-a")
    os.symlink(inbox / "loop-a", inbox / "loop-b")
    return "loop-a"


def _deep(inbox):
    return "/".join(["d" * 200] * 30) + "/x.safetensors"  # longer than PATH_MAX


def _folder(inbox):
    (inbox / "folder.safetensors").mkdir()
    return "folder.safetensors"


def _fifo(inbox):
    os.mkfifo(inbox / "pipe.safetensors")
    return "pipe.safetensors"


def _through_a_file(inbox):
    return "shapes.safetensors/x"


PATHS = {
    "name too long": (lambda inbox: "a" * 300, 422),
    "symlink loop": (_loop, 422),
    "path too long": (_deep, 422),
    "a folder": (_folder, 404),
    "a fifo": (_fifo, 404),
    "through a file": (_through_a_file, 404),
    "escaping symlink": (lambda inbox: os.symlink("/etc/hostname", inbox / "out") or "out", 422),
}


@pytest.mark.parametrize("case", sorted(PATHS))
def test_odd_paths_are_a_4xx_naming_path(tiny_runs, dirs, case):
    _, _, inbox = dirs
    make, status = PATHS[case]
    path = make(inbox)

    async def scenario():
        async with running(make_app(tiny_runs, dirs)) as client:
            return await client.put("/tasks/t", json={"path": path}, headers=ADMIN)

    refused(run(scenario()), status, "path")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_an_unreadable_artifact_is_a_4xx_naming_path(tiny_runs, dirs):
    _, _, inbox = dirs
    (inbox / "shapes.safetensors").chmod(0)

    async def scenario():
        async with running(make_app(tiny_runs, dirs)) as client:
            return await client.put("/tasks/t", json={"path": "shapes.safetensors"}, headers=ADMIN)

    refused(run(scenario()), 422, "path")


# -- restarts --------------------------------------------------------------------------------------


def test_a_restart_skips_a_bad_stored_artifact(tiny_runs, dirs):
    """A stored copy edited on disk, and a registry naming a path-like version: both are
    skipped with their reason logged, and the rest serves."""
    import json

    _, data, _ = dirs

    async def first():
        async with running(make_app(tiny_runs, dirs)) as client:
            for task, name in (("a", "shapes"), ("b", "textures")):
                await client.put(
                    f"/tasks/{task}", json={"path": f"{name}.safetensors"}, headers=ADMIN
                )
            return (await client.get("/tasks/b", headers=QUERY)).json()["prompt_version"]

    version_b = run(first())
    stored = data / "registry" / "artifacts" / "b" / f"{version_b}.safetensors"
    meta, tensors = read_raw(stored)
    tensors["text.value_m"] = tensors["text.value_m"] * 1e30
    write_raw(stored, seal(meta, tensors), tensors)  # self-consistent, but not its name
    state_file = data / "registry" / "registry.json"
    state = json.loads(state_file.read_text())
    state["tasks"]["c"] = {"active": "../../../x", "versions": {"../../../x": "artifacts/c/x"}}
    state_file.write_text(json.dumps(state))

    async def second():
        app = make_app(tiny_runs, dirs)
        async with running(app) as client:
            served = await embed(client, "a")
            missing = await embed(client, "b")
            return app.state.restore_failures, served, missing

    failures, served, missing = run(second())
    assert sorted(f.split("@")[0] for f in failures) == ["b", "c"], failures
    assert served.status_code == 200 and is_unit_vector_list(served.json()["text_embeddings"])
    assert missing.status_code == 404
