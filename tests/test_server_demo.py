"""The embedded demo bundle: built once from the repo's own pieces, reused, never half-used."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time

import pytest

import export
import lpi
from server.demo import MANIFEST, QUICK_SIZES, ensure_demo_bundle

# A few seconds per build: the server's --demo-size quick, with even less pretraining.
SIZES = dataclasses.replace(QUICK_SIZES, pretrain_images=64, pretrain_epochs=1)
TASKS = 2


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "bundle"
    start = time.perf_counter()
    bundle = ensure_demo_bundle(root, tasks=TASKS, progress=False, sizes=SIZES)
    return bundle, time.perf_counter() - start


def _copy(bundle, tmp_path):
    """A private copy of the built root, for tests that damage it."""
    root = tmp_path / "copy"
    shutil.copytree(bundle.root, root)
    return root


def _captions(bundle) -> dict[str, list[tuple[str, str]]]:
    return {task: [(i.id, i.caption) for i in items] for task, items in bundle.items.items()}


def test_artifacts_read_back_against_the_backbone(built):
    bundle, _ = built
    backbone = lpi.load_backbone(bundle.backbone)
    assert list(bundle.artifacts) == ["shapes-colours", "textures"]
    for task, path in bundle.artifacts.items():
        artifact = export.read_artifact(path, backbone)  # checksum, shapes, backbone fingerprint
        assert artifact.name == task
        assert set(artifact.keys) == {"image", "text"}  # task keys for routing


def test_items_are_each_tasks_test_images_with_stable_ids(built):
    bundle, _ = built
    assert list(bundle.items) == list(bundle.artifacts)
    ids = [item.id for items in bundle.items.values() for item in items]
    assert len(ids) == len(set(ids)) == TASKS * SIZES.test_per_task
    for task, items in bundle.items.items():
        assert [item.id for item in items] == [f"{task}-{n}" for n in range(len(items))]
        for item in items:
            assert item.task == task and item.image.is_file()
            assert item.image.is_relative_to(bundle.root)
            assert item.caption.strip() and item.payload == {
                "caption": item.caption,
                "split": "test",
            }
    assert set(bundle.metrics["r1_oracle"]) == set(bundle.artifacts)


def test_only_the_bundle_is_left_under_root(built):
    bundle, _ = built
    names = {path.name for path in bundle.root.iterdir()}
    content = [name for name in names if name.startswith("demo-")]
    assert len(content) == 1 and names == {MANIFEST, ".lock", *content}
    assert not (bundle.root / content[0] / "data").exists(), "training images are dropped"


def test_second_call_reuses_the_bundle(built):
    bundle, _ = built
    stamp = (bundle.root / MANIFEST).stat().st_mtime_ns
    contents = sorted(p.name for p in bundle.root.iterdir())
    again = ensure_demo_bundle(bundle.root, tasks=TASKS, progress=False, sizes=SIZES)
    assert again == bundle
    assert (bundle.root / MANIFEST).stat().st_mtime_ns == stamp  # not rewritten
    assert sorted(p.name for p in bundle.root.iterdir()) == contents  # nothing built


def test_moved_root_is_reused(built, tmp_path):
    """The manifest's paths are relative to the root: a copied or remounted folder still serves."""
    bundle, _ = built
    root = _copy(bundle, tmp_path)
    moved = ensure_demo_bundle(root, tasks=TASKS, progress=False, sizes=SIZES)
    assert moved.backbone == root / bundle.backbone.relative_to(bundle.root)
    assert (root / MANIFEST).read_bytes() == (bundle.root / MANIFEST).read_bytes(), "not rebuilt"
    for task, items in bundle.items.items():
        assert [item.image.relative_to(root) for item in moved.items[task]] == [
            item.image.relative_to(bundle.root) for item in items
        ]


def test_leftover_build_folder_without_manifest_is_rebuilt(built, tmp_path):
    """A build killed halfway leaves .build-* and no bundle.json: the next call starts afresh."""
    bundle, _ = built
    root = _copy(bundle, tmp_path)
    (root / MANIFEST).unlink()
    junk = root / ".build-junk"
    (junk / "data").mkdir(parents=True)
    (junk / "backbone.safetensors").write_bytes(b"half a file")
    old = [path for path in root.iterdir() if path.name.startswith("demo-")]
    rebuilt = ensure_demo_bundle(root, tasks=TASKS, progress=False, sizes=SIZES)
    assert not junk.exists() and not any(path.exists() for path in old)
    backbone = lpi.load_backbone(rebuilt.backbone)
    for path in rebuilt.artifacts.values():
        export.read_artifact(path, backbone)
    assert all(item.image.is_file() for items in rebuilt.items.values() for item in items)
    assert _captions(rebuilt) == _captions(bundle), "a rebuild gives the same items, same ids"
    assert json.loads((root / MANIFEST).read_text())["recipe"]["tasks"] == TASKS


def test_missing_file_or_other_recipe_is_rebuilt(built, tmp_path):
    bundle, _ = built
    root = _copy(bundle, tmp_path)
    first = ensure_demo_bundle(root, tasks=TASKS, progress=False, sizes=SIZES)
    next(iter(first.artifacts.values())).unlink()
    second = ensure_demo_bundle(root, tasks=TASKS, progress=False, sizes=SIZES)
    assert second.backbone != first.backbone and all(p.is_file() for p in second.artifacts.values())
    third = ensure_demo_bundle(root, tasks=1, progress=False, sizes=SIZES)
    assert list(third.artifacts) == ["shapes-colours"] and not second.backbone.exists()


def test_importing_the_demo_loads_no_web_framework():
    """The app calls it at startup; it must not pull fastapi in (or need it installed)."""
    code = "import sys, server.demo; sys.exit('fastapi' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_task_count_beyond_the_synthetic_tasks_is_refused(tmp_path):
    with pytest.raises(ValueError, match="tasks: the demo has 1 to 4 tasks, got 5"):
        ensure_demo_bundle(tmp_path / "demo", tasks=5, progress=False, sizes=SIZES)
    assert not (tmp_path / "demo").exists()


def test_the_server_on_its_defaults_serves_the_demo(tmp_path):
    """No backbone configured: the app answers at once while it builds the (quick) bundle, then
    loads its tasks and indexes their test images, so a search by a test image finds it first.
    """
    import asyncio
    import base64

    from server.app import create_app
    from server.settings import Settings
    from tests.server_helpers import run, running
    from wire.schema import Readiness

    config = Settings(
        data_dir=tmp_path / "data", store="memory", demo_tasks=TASKS, demo_size="quick"
    )

    async def scenario():
        async with running(create_app(config)) as client:
            first = {
                path: await client.request(method, path, json=body)
                for method, path, body in [
                    ("GET", "/healthz", None),
                    ("GET", "/readyz", None),
                    ("GET", "/tasks", None),
                    ("POST", "/search", {"task": "textures", "query": {"text": "a"}}),
                ]
            }
            seen = []
            for _ in range(15000):  # the build reports each step; at most 5 min
                ready = await client.get("/readyz")
                if ready.status_code == 200:
                    break
                seen.append(Readiness.model_validate_json(ready.content))
                await asyncio.sleep(0.02)
            tasks = (await client.get("/tasks")).json()["tasks"]
            bundle = ensure_demo_bundle(tmp_path / "data" / "demo", tasks=TASKS, sizes=QUICK_SIZES)
            task, items = next(iter(bundle.items.items()))
            image = base64.b64encode(items[0].image.read_bytes()).decode()
            found = await client.post(
                "/search", json={"task": task, "query": {"image": image}, "top_k": 1}
            )
            return first, seen, ready, tasks, items, found.json()

    first, seen, ready, tasks, items, found = run(scenario())
    assert first["/healthz"].status_code == 200
    building = Readiness.model_validate_json(first["/readyz"].content)
    assert first["/readyz"].status_code == 503 and not building.ready
    assert building.building and 0 <= building.progress <= 1 and building.reasons
    for path in ("/tasks", "/search"):  # data routes: 503, JSON, when to come back
        assert first[path].status_code == 503, path
        assert first[path].json()["error"]["type"] == "starting"
        assert 1 <= int(first[path].headers["retry-after"]) <= 60
    labels = [r.building for r in [building, *seen]]
    assert any(label.startswith("demo 2/4: pretraining") for label in labels), labels
    progress = [r.progress for r in [building, *seen]]
    assert progress == sorted(progress), "progress never goes back"
    assert ready.status_code == 200 and Readiness.model_validate_json(ready.content).ready
    assert len(tasks) == TASKS
    assert all(t["vectors"] == QUICK_SIZES.test_per_task for t in tasks)
    assert found["hits"][0]["id"] == items[0].id
    assert found["hits"][0]["payload"]["caption"] == items[0].caption
