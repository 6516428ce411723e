"""Task names the server did not get from a request are checked like a request's: a name from
registry.json, from a demo bundle's manifest or from a caller of `TaskRegistry.load` becomes a
folder name, so a path-like one is refused before anything is written, and a malformed
registry.json entry is skipped with its reason instead of stopping the start."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from server import demo
from server.registry.errors import InvalidTaskNameError, check_task_name
from server.registry.restore import restore_tasks

BAD_NAMES = ["../../x", "/abs", "a/b", "", "UPPER", "x\n", 7, None]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_check_task_name_refuses_what_is_not_a_name(name):
    with pytest.raises(InvalidTaskNameError) as caught:
        check_task_name(name)
    assert caught.value.field == "task"


def test_check_task_name_returns_a_good_name():
    assert check_task_name("shapes-colours") == "shapes-colours"


def test_restore_skips_malformed_entries_and_restores_the_rest(caplog):
    restored: list[tuple[str, str, str]] = []

    def restore_one(task: str, version: str, active: str) -> None:
        restored.append((task, version, active))

    entries = {
        "good": {"active": "v1", "versions": {"v1": "artifacts/good/v1.safetensors"}},
        "../escape": {"active": "v1", "versions": {"v1": "x"}},
        "no-versions": {"active": "v1"},
        "no-active": {"versions": {"v1": "x"}},
        "not-an-object": ["v1"],
        "odd-versions": {"active": "v1", "versions": 5},
    }
    with caplog.at_level(logging.ERROR, logger="server.registry"):
        failures, unrestored = restore_tasks(
            entries, restore_one, store_serving=lambda task: None, is_loaded=lambda task: False
        )
    assert restored == [("good", "v1", "v1")]
    failed_tasks = sorted(f.split(":")[0] for f in failures)
    assert failed_tasks == sorted(t for t in entries if t != "good")
    assert unrestored == {}  # a malformed entry is not kept to retry: there is nothing to retry
    assert all("not restored" in r.getMessage() for r in caplog.records)


def _manifest(root: Path, recipe: dict, **changes) -> None:
    manifest = {
        "format": demo.FORMAT,
        "version": demo.FORMAT_VERSION,
        "recipe": recipe,
        "backbone": "content/backbone.safetensors",
        "artifacts": {"shapes": "content/shapes.safetensors"},
        "items": {"shapes": [{"id": "1", "image": "content/1.png", "caption": "c", "payload": {}}]},
    }
    manifest.update(changes)
    for name in ("backbone.safetensors", "shapes.safetensors", "1.png"):
        (root / "content").mkdir(exist_ok=True)
        (root / "content" / name).write_bytes(b"x")
    (root / demo.MANIFEST).write_text(json.dumps(manifest))


def test_a_well_formed_demo_manifest_loads(tmp_path):
    _manifest(tmp_path, {"r": 1})
    bundle = demo._load(tmp_path, {"r": 1})
    assert bundle is not None and set(bundle.artifacts) == {"shapes"}


@pytest.mark.parametrize(
    "changes",
    [
        {"artifacts": {"../../evil": "content/shapes.safetensors"}},
        {"items": {"a/b": []}},
        {"backbone": "/etc/passwd"},
        {"backbone": "../outside.safetensors"},
        {"artifacts": {"shapes": "../../outside.safetensors"}},
        {"items": {"shapes": [{"id": "1", "image": "/abs.png", "caption": "c", "payload": {}}]}},
        {"artifacts": ["not", "a", "mapping"]},
    ],
    ids=[
        "task-path",
        "task-slash",
        "abs-backbone",
        "up-backbone",
        "up-artifact",
        "abs-image",
        "not-a-mapping",
    ],
)
def test_a_demo_manifest_that_escapes_its_folder_is_rebuilt_not_trusted(tmp_path, changes):
    _manifest(tmp_path, {"r": 1}, **changes)
    assert demo._load(tmp_path, {"r": 1}) is None


def test_a_refused_multi_task_pin_gives_back_the_pins_it_took():
    """`task="auto"` pins every routed task at once; when a later one is gone (unloaded while the
    bare pass ran), the earlier ones' pins must go back, or their unload waits forever."""
    from pathlib import Path as _Path

    from server.registry.errors import TaskNotLoadedError
    from server.registry.versions import LoadedVersion, VersionTable

    table = VersionTable(drop=lambda key: None, changed=lambda: None)
    loaded = LoadedVersion("v1", artifact=None, file=_Path("unused"), loaded_at=0.0)  # type: ignore[arg-type]
    table.add_restored("a", loaded, active="v1", serving="v1")
    with pytest.raises(TaskNotLoadedError), table.pin_many(["a", "gone"], "active"):
        pass
    assert table.tasks["a"].pins() == 0
    with table.pin_many(["a"], "active") as keys:
        assert keys == {"a": ("a", "v1")} and table.tasks["a"].pins() == 1
    assert table.tasks["a"].pins() == 0
