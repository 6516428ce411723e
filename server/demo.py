"""The server's embedded default: a tiny CLIP pretrained on synthetic data, with a few tasks.

A server started without a backbone serves this bundle, so `python -m server` works offline on
a bare machine. The first call builds it with `export.bundle.build_bundle` (synthetic data,
pretraining of the `tiny` preset, LPI prompts task after task, one checked artifact per task;
about a minute on two CPU cores: `DemoSizes`), later calls reuse it.

Layout under `root` (paths in the manifest are relative to it, so the folder can move):

    bundle.json             the manifest; written last and atomically, its presence means done
    demo-XXXX/              backbone.safetensors, artifacts/ (one file per task, index.json),
                            images/TASK/ (the tasks' test images: the demo's items)
    .build-XXXX/            a build in progress; one left by a crash is removed by the next build
    .lock                   held while building, so two processes never build at once

A build happens in a fresh `.build-XXXX` folder renamed into place only when complete, then
`bundle.json` is replaced; nothing half-built is ever listed. A manifest whose recipe (task
count and sizes) differs from the one asked for, or that lists a missing file, is rebuilt.
A `Control` stops a build (or the wait for another process's) between two steps; the
unfinished folder is removed, or by the next build if the process dies first.

`progress` logs each stage at INFO (DEBUG when off); the per-epoch bars of pretraining and
training are lpi's own (TQDM_DISABLE=1 silences them).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lpi import atomic
from lpi.continual.control import NO_CONTROL, Control
from lpi.continual.data.synthetic import TASK_NAMES
from wire.schema import is_task_name

log = logging.getLogger(__name__)

FORMAT = "lpi-demo-bundle"
FORMAT_VERSION = 1
MANIFEST = "bundle.json"
LOCK = ".lock"
BUILD_PREFIX = ".build-"
CONTENT_PREFIX = "demo-"
PRESET = "tiny"  # 4 layers of width 64 per tower, 32 px images: trains in seconds on a CPU
PRETRAIN_LR = 2e-3  # lpi.pretrain's default; 5e-3 reached a worse loss in the same steps
PRETRAIN_WEIGHT_DECAY = 0.1
PRETRAIN_BATCH = 128  # CLIP's loss wants many negatives per batch
TASK_LR = 3e-2  # the demo's own rate for its tiny tasks (lpi.train picks one per method)


@dataclass(frozen=True)
class DemoSizes:
    """How much data and training one build uses.

    The defaults build in 64 s on two idle CPU cores (data 4 s, pretraining 50 s, prompts 9 s)
    and reach recall@1 of 15 / 47 / 32 % on the three tasks' 50-image galleries (chance 2 %).
    Pretraining is most of the time and most of the quality: 4,000 images x 15 epochs end at
    loss 1.10; 3,000 x 10 (about 25 s less) at 2.31, with about half the recall.
    """

    pretrain_images: int = 4000
    pretrain_epochs: int = 15
    train_per_task: int = 400  # a task's prompts are ~1,900 parameters: a few hundred suffice
    test_per_task: int = 50  # the items a task serves; chance recall@1 is 1 / 50
    task_epochs: int = 10  # about 3 s per task
    image_size: int = 32  # the tiny preset's input (16 patches of 8 px): no resize needed
    layers: int = 4  # J: every layer of the tiny towers
    tokens: int = 8  # N prompt tokens per modality
    batch_size: int = 64  # of task training; pretraining uses PRETRAIN_BATCH
    seed: int = 0


DEFAULT_SIZES = DemoSizes()
# For tests and smoke runs: seconds to build, recall near chance. Its pretraining still takes
# two steps of 128 images, long enough to be seen (and stopped) from outside.
QUICK_SIZES = DemoSizes(
    pretrain_images=128,
    pretrain_epochs=2,
    train_per_task=24,
    test_per_task=6,
    task_epochs=1,
    layers=2,
    tokens=4,
    batch_size=8,
)
SIZES = {"full": DEFAULT_SIZES, "quick": QUICK_SIZES}  # the server's --demo-size
LOCK_POLL_S = 0.2  # how often a process waiting for another's build checks its Control


@dataclass(frozen=True)
class DemoItem:
    """One test image of a task: what the demo indexes and searches."""

    id: str
    task: str
    image: Path
    caption: str
    payload: dict


@dataclass(frozen=True)
class DemoBundle:
    """A built bundle: the backbone file, one artifact per task, each task's test items."""

    root: Path
    backbone: Path
    artifacts: dict[str, Path]  # task -> artifact file
    items: dict[str, list[DemoItem]]  # task -> its test items
    metrics: dict = dataclasses.field(default_factory=dict)  # recall@1 from lpi.train


def ensure_demo_bundle(
    root: Path,
    *,
    tasks: int = 3,
    progress: bool = True,
    sizes: DemoSizes = DEFAULT_SIZES,
    control: Control = NO_CONTROL,
) -> DemoBundle:
    """The bundle under `root`, built first if there is no complete one of this recipe.

    `tasks` takes the first of the synthetic tasks (shapes-colours, textures, positions,
    sizes-backgrounds). Raises ValueError for a task count the synthetic data does not have,
    `Cancelled` when `control` is cancelled while waiting or building.
    """
    if not 1 <= tasks <= len(TASK_NAMES):
        raise ValueError(f"tasks: the demo has 1 to {len(TASK_NAMES)} tasks, got {tasks}")
    root = Path(root).absolute()
    recipe = _recipe(tasks, sizes)
    bundle = _load(root, recipe)
    if bundle is not None:
        return bundle
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / LOCK, control):
        bundle = _load(root, recipe)  # another process may have built it while we waited
        if bundle is None:
            bundle = _build(root, tasks, sizes, recipe, progress, control)
    return bundle


def _recipe(tasks: int, sizes: DemoSizes) -> dict:
    return {"preset": PRESET, "tasks": tasks, **dataclasses.asdict(sizes)}


@contextmanager
def _locked(path: Path, control: Control):
    """An exclusive advisory lock on `path`, released when the block ends (or the process dies).

    Waits by polling, so a server stopping while another process builds stops at once."""
    with open(path, "a+b") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                control.part(0.0, 0.0, "waiting for another process's demo build").step(0, 1)
                time.sleep(LOCK_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- reading a built bundle --------------------------------------------------------------------


def _load(root: Path, recipe: dict) -> DemoBundle | None:
    """The bundle `bundle.json` describes, or None if absent, of another recipe, or incomplete."""
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("%s: unreadable (%s); rebuilding the demo bundle", path, error)
        return None
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        log.warning("%s: not a version %d demo bundle; rebuilding", path, FORMAT_VERSION)
        return None
    if manifest.get("recipe") != recipe:
        log.info("%s: built with another recipe; rebuilding the demo bundle", path)
        return None
    try:
        bundle = _from_manifest(root, manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        log.warning("%s: malformed (%s); rebuilding the demo bundle", path, error)
        return None
    missing = [p for p in _files(bundle) if not p.is_file()]
    if missing:
        log.warning(
            "%s: %d listed file(s) missing, e.g. %s; rebuilding", path, len(missing), missing[0]
        )
        return None
    return bundle


def _from_manifest(root: Path, manifest: dict) -> DemoBundle:
    """The bundle a manifest lists; ValueError for a task name that is not one or a file
    outside `root` (names become folder names, files are read: neither may escape)."""
    for task in (*manifest["items"], *manifest["artifacts"]):
        if not is_task_name(task):
            raise ValueError(f"{task!r} is not a task name")
    items = {
        task: [
            DemoItem(
                item["id"], task, _inside(root, item["image"]), item["caption"], item["payload"]
            )
            for item in entries
        ]
        for task, entries in manifest["items"].items()
    }
    return DemoBundle(
        root=root,
        backbone=_inside(root, manifest["backbone"]),
        artifacts={task: _inside(root, file) for task, file in manifest["artifacts"].items()},
        items=items,
        metrics=manifest.get("metrics", {}),
    )


def _inside(root: Path, relative: str) -> Path:
    """`root / relative`, refusing an absolute path or one that leaves `root`."""
    if not isinstance(relative, str) or not (root / relative).resolve().is_relative_to(
        root.resolve()
    ):
        raise ValueError(f"{relative!r} is not a file inside the bundle")
    return root / relative


def _files(bundle: DemoBundle) -> list[Path]:
    images = [item.image for items in bundle.items.values() for item in items]
    return [bundle.backbone, *bundle.artifacts.values(), *images]


# --- building one ------------------------------------------------------------------------------


def _build(
    root: Path, tasks: int, sizes: DemoSizes, recipe: dict, progress: bool, control: Control
) -> DemoBundle:
    """Build in a fresh .build-XXXX folder, rename it into place, then write bundle.json."""
    for stale in root.glob(BUILD_PREFIX + "*"):  # left by a build that died; we hold the lock
        log.info("removing %s, left by an unfinished build", stale)
        shutil.rmtree(stale, ignore_errors=True)
    level = logging.INFO if progress else logging.DEBUG
    log.log(level, "building the demo bundle in %s (once; about a minute on 2 CPU cores)", root)
    start = time.perf_counter()
    suffix = uuid.uuid4().hex[:8]  # a fresh name per build; mkdir keeps the umask's modes
    build, content = root / (BUILD_PREFIX + suffix), root / (CONTENT_PREFIX + suffix)
    build.mkdir()
    try:
        manifest = _build_into(build, content.name, tasks, sizes, _logged(control, level))
        build.rename(content)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    manifest.update(recipe=recipe, seconds=round(time.perf_counter() - start, 1))
    atomic.write_json(root / MANIFEST, manifest)
    for old in root.glob(CONTENT_PREFIX + "*"):  # earlier builds' content, no longer listed
        if old != content:
            shutil.rmtree(old, ignore_errors=True)
    log.log(
        level,
        "demo bundle ready in %.0f s: recall@1 per task %s (chance %.0f)",
        manifest["seconds"],
        manifest["metrics"]["r1_oracle"],
        100 / sizes.test_per_task,
    )
    return _from_manifest(root, manifest)


def _logged(control: Control, level: int) -> Control:
    """`control` under the label "demo", also logging each stage once when it starts."""
    seen: set[str] = set()
    report = control.report

    def logged(label: str, fraction: float) -> None:
        stage = label.split(" (")[0]
        if stage not in seen:
            seen.add(stage)
            log.log(level, "%s", stage)
        if report is not None:
            report(label, fraction)

    return dataclasses.replace(control, report=logged).part(0.0, 1.0, "demo")


def recipe_of(tasks: int, sizes: DemoSizes):
    """The bundle builder's recipe of a demo of `tasks` tasks and these sizes."""
    from export.bundle import BundleRecipe

    return BundleRecipe(
        tasks=tasks,
        train_per_task=sizes.train_per_task,
        test_per_task=sizes.test_per_task,
        pretrain_images=sizes.pretrain_images,
        image_size=sizes.image_size,
        preset=PRESET,
        pretrain_epochs=sizes.pretrain_epochs,
        backbone_seed=sizes.seed,
        pretrain_lr=PRETRAIN_LR,
        pretrain_weight_decay=PRETRAIN_WEIGHT_DECAY,
        pretrain_batch_size=PRETRAIN_BATCH,
        methods=("lpi",),
        layers=sizes.layers,
        tokens=sizes.tokens,
        epochs=sizes.task_epochs,
        batch_size=sizes.batch_size,
        lr=TASK_LR,
        seed=sizes.seed,
        export=True,
    )


def _build_into(build: Path, name: str, tasks: int, sizes: DemoSizes, control: Control) -> dict:
    """Every file of a bundle under `build`, to be renamed `name`; returns the manifest."""
    from export.bundle import build_bundle

    def listed(path: Path) -> str:  # the path relative to the root once renamed
        return f"{name}/{path.relative_to(build).as_posix()}"

    built = build_bundle(recipe_of(tasks, sizes), build, control=control)
    state = built.states["lpi"]
    items = _keep_test_images(built.manifest, build / "images", state.done)
    control.check()
    shutil.rmtree(build / "data")  # training and pretraining images: only test items are served
    shutil.rmtree(built.runs["lpi"])
    final = state.results[-1]["r1"]
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "backbone": listed(built.backbone),
        "artifacts": {task: listed(path) for task, path in built.artifacts["lpi"].items()},
        "items": {
            task: [entry | {"image": listed(entry["image"])} for entry in entries]
            for task, entries in items.items()
        },
        "metrics": {  # recall@1 (%), mean of both directions, on each task's test items
            "r1_oracle": _rounded(final["oracle"]),
            "r1_routed": _rounded(final["routed"]),
            "r1_chance": round(100 / sizes.test_per_task, 2),
        },
    }


def _keep_test_images(manifest: Path, images: Path, tasks: list[str]) -> dict[str, list[dict]]:
    """Move each task's test images to images/TASK/; their entries, ids in manifest order."""
    from lpi.continual.data.manifest import read_manifest, select

    records = read_manifest(manifest)
    items = {}
    for task in tasks:
        folder = images / task
        folder.mkdir(parents=True)
        items[task] = []
        for index, record in enumerate(select(records, task, "test")):
            image = record.image.rename(folder / record.image.name)
            caption = record.captions[0]
            items[task].append(
                {
                    "id": f"{task}-{index}",
                    "image": image,
                    "caption": caption,
                    "payload": {"caption": caption, "split": "test"},
                }
            )
    return items


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 2) for key, value in values.items()}
