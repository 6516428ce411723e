"""Synthetic captioned images: a continual retrieval benchmark that builds in seconds.

Each image holds one or two drawn objects with a shape, colour, texture, size and position on a
background; its captions name some of those attributes. Tasks are attribute families:

    shapes-colours     two objects, "a red circle next to a blue star"   (binding; dark ground)
    textures           "a large striped red circle"                      (light ground)
    positions          "a small red circle in the top left"              (slate ground, 3x3 grid)
    sizes-backgrounds  "a small red circle on a teal background"         (named coloured grounds)

Each task's images also look different as a whole (its own background family), so K-Means
task keys on frozen features can route a query to its task. A separate pretraining set is
"partly unseen": every caption names shape and colour, and each of size, texture and position
is also named (and drawn accordingly) with probability 0.4 ("a small striped red circle in the
top left"); unnamed ones stay plain, medium or large, anywhere, so a tiny ViT still learns
shape. Backgrounds, two-object scenes and the tasks' templates never occur in pretraining, so
task prompts have something to learn: a frozen tower cannot tell apart captions that differ
only in words it never saw, and prompts cannot create that distinction, but they can learn new
grounds, binding and task-specific combinations of words it knows.

That is the "classic" suite, the default (tests and the demo bundle build on it, byte for
byte). The "bench" suite (`lpi.continual.data.synthetic_bench`) adds two tasks, val splits,
related and unrelated task pairs on purpose, and a pretraining set whose captions use every
word the tasks use, on varied grounds. Every run writes task_families.json and the true task
similarity, task_similarity.json, beside the manifest.

Val and test images draw distinct attribute combinations (without replacement), so no two
images of such a split share a caption's meaning and recall@1 is well defined. Everything is
a function of the seed.

    python -m lpi.continual.data.synthetic --out data/synthetic --tasks 4 --seed 0
    python -m lpi.continual.data.synthetic --out data/bench --suite bench --image-size 32 \
        --pretrain 10000
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lpi import atomic
from lpi.continual.control import NO_CONTROL, Control
from lpi.continual.data.drawing import RGB, Scene, render
from lpi.continual.data.manifest import Record, write_manifest
from lpi.continual.data.synthetic_bench import (
    BENCH_PRETRAIN,
    BENCH_TASKS,
    bench_caption,
    bench_pretrain_extras,
    families,
    plural,
    similarity_matrix,
)
from lpi.continual.data.synthetic_tasks import (
    POSITIONS,
    PRETRAIN,
    TASKS,
    TaskSpec,
    contrasts,
    pretrain_extras,
)
from lpi.continual.data.synthetic_tasks import (
    TASK_NAMES as TASK_NAMES,
)
from lpi.continual.similarity import write_similarity

log = logging.getLogger(__name__)

_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou])")
CAPTIONS_PER_IMAGE = 3
# suite -> (its pretraining set, its tasks, default images per task of train, val, test)
SUITES: dict[str, tuple[TaskSpec, tuple[TaskSpec, ...], tuple[int, int, int]]] = {
    "classic": (PRETRAIN, TASKS, (1000, 0, 200)),
    "bench": (BENCH_PRETRAIN, BENCH_TASKS, (1000, 200, 500)),
}


def task_spec(name: str) -> TaskSpec:
    """The task (or pretraining set) of this name in any suite."""
    for pretrain, tasks, _ in SUITES.values():
        for task in (pretrain, *tasks):
            if task.name == name:
                return task
    known = sorted({t.name for p, ts, _ in SUITES.values() for t in (p, *ts)})
    raise ValueError(f"unknown synthetic task {name!r}; choose from {', '.join(known)}")


# --- attribute sampling and captions -----------------------------------------------------------


@cache
def combinations(name: str) -> tuple[dict, ...]:
    """Every drawable attribute combination of a task (enough contrast, two distinct objects)."""
    task = task_spec(name)
    keys = [key for key, _ in task.families]
    result = []
    for values in itertools.product(*(values for _, values in task.families)):
        attrs = dict(zip(keys, values, strict=True))
        if _drawable(attrs, task.nominal_ground(attrs)):
            result.append(attrs)
    return tuple(result)


def _drawable(attrs: dict, ground: RGB) -> bool:
    if not contrasts(attrs, ground):
        return False
    if "shape2" in attrs:  # two identical objects would be "two red circles"
        return (attrs["shape"], attrs["colour"]) != (attrs["shape2"], attrs["colour2"])
    return True


def captions_for(
    task: TaskSpec, attrs: dict, rng: np.random.Generator, count: int
) -> tuple[str, ...]:
    """`count` captions from distinct templates; each names every attribute of the scene."""
    if task is BENCH_PRETRAIN:  # phrasings drawn at random; distinct when a few tries allow
        drawn: list[str] = []
        for _ in range(4 * count):
            caption = with_articles(bench_caption(attrs, rng))
            if caption not in drawn:
                drawn.append(caption)
            if len(drawn) == count:
                break
        return tuple(drawn)
    where = POSITIONS[attrs["position"]][1] if "position" in attrs else ""
    if task is PRETRAIN:  # optional attributes: adjectives and a trailing position phrase
        where = " " + where if where else ""
    adjectives = "".join(f"{attrs[key]} " for key in ("size", "texture") if key in attrs)
    chosen = rng.choice(len(task.templates), size=min(count, len(task.templates)), replace=False)
    return tuple(
        with_articles(
            task.templates[i].format(
                **attrs, where=where, adjectives=adjectives, plural=plural(attrs["shape"])
            )
        )
        for i in chosen
    )


def with_articles(text: str) -> str:
    """ "a orange circle" -> "an orange circle"."""
    return _BEFORE_VOWEL.sub("an ", text)


def make_scenes(
    name: str, split: str, count: int, seed: int, captions_per_image: int = CAPTIONS_PER_IMAGE
) -> list[Scene]:
    """The scenes of one task and split: a pure function of (name, split, count, seed)."""
    task = task_spec(name)
    pool = combinations(name)
    rng = np.random.default_rng([seed, _stable_id(name), _stable_id(split)])
    scenes = []
    for index in draw_picks(rng, len(pool), count, name, split):
        attrs = dict(pool[index])  # a copy: the pool is cached
        if task is PRETRAIN:
            attrs = pretrain_extras(attrs, rng)
        elif task is BENCH_PRETRAIN:
            attrs = bench_pretrain_extras(attrs, rng)
        ground, style = task.ground(attrs, rng)
        things = task.compose(attrs, rng)
        captions = captions_for(task, attrs, rng, captions_per_image)
        scenes.append(Scene(ground, style, things, attrs, captions, int(rng.integers(2**31))))
    return scenes


def _stable_id(text: str) -> int:
    """A seed component from a name that, unlike hash(), is the same in every process."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def draw_picks(
    rng: np.random.Generator, size: int, count: int, name: str, split: str
) -> np.ndarray:
    """`count` indices into a pool of `size` combinations. Val and test (evaluated splits,
    where every caption must name one image) draw without replacement, cycling through fresh
    permutations (with a warning) only when `count` exceeds `size`; train draws any."""
    if split not in ("val", "test"):
        return rng.integers(size, size=count)
    if count > size:
        log.warning("%s: %d %s images but only %d distinct combinations", name, count, split, size)
    rounds = -(-count // size)
    return np.concatenate([rng.permutation(size) for _ in range(rounds)])[:count]


# --- the dataset on disk -----------------------------------------------------------------------


def unique_fraction(records: list[Record]) -> float:
    """Fraction of captions that occur exactly once among these records' captions."""
    counts = Counter(caption for record in records for caption in record.captions)
    total = sum(counts.values())
    return sum(n == 1 for n in counts.values()) / total if total else 1.0


def generate(
    out: str | Path,
    tasks: int | None = None,
    train_per_task: int | None = None,
    test_per_task: int | None = None,
    pretrain: int = 4000,
    image_size: int = 64,
    seed: int = 0,
    progress: bool = False,
    control: Control = NO_CONTROL,
    suite: str = "classic",
    val_per_task: int | None = None,
) -> dict:
    """Write PNGs, manifest.jsonl (tasks), pretrain.jsonl, synthetic.json, task_families.json
    and task_similarity.json; return the summary.

    `suite` picks the task set ("classic": the first four tasks and a pretraining set without
    backgrounds, what tests and the demo use; "bench": six tasks with related pairs, val
    splits, and pretraining on every word the tasks use). `tasks` takes the suite's first
    ones (None: all); None sizes take the suite's defaults. `control` is stepped after each
    image: cancelling it stops between two images.
    """
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {', '.join(SUITES)}, got {suite!r}")
    pretrain_spec, suite_tasks, (train_default, val_default, test_default) = SUITES[suite]
    tasks = len(suite_tasks) if tasks is None else tasks
    train_per_task = train_default if train_per_task is None else train_per_task
    val_per_task = val_default if val_per_task is None else val_per_task
    test_per_task = test_default if test_per_task is None else test_per_task
    if not 1 <= tasks <= len(suite_tasks):
        raise ValueError(f"tasks must be in 1..{len(suite_tasks)}, got {tasks}")
    if min(train_per_task, pretrain) < 1 or min(test_per_task, val_per_task) < 0:
        raise ValueError("train_per_task and pretrain must be >= 1, val and test >= 0")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in (*OUTPUTS, "synthetic.json"):
        (out / name).unlink(missing_ok=True)  # no stale manifest over half-rewritten images
    chosen = suite_tasks[:tasks]
    sizes = (("train", train_per_task), ("val", val_per_task), ("test", test_per_task))
    plan = [(task.name, split, n) for task in chosen for split, n in sizes if n or split != "val"]
    # One pretrain test image per shape-colour pair at most, so its captions stay unique.
    pretrain_test = min(test_per_task, len(combinations(pretrain_spec.name)))
    plan += [(pretrain_spec.name, "train", pretrain), (pretrain_spec.name, "test", pretrain_test)]
    start = time.perf_counter()
    total = sum(n for *_, n in plan)
    bar = tqdm(total=total, unit="img", disable=None if progress else True)
    written = itertools.count(1)

    def tick() -> None:
        bar.update()
        control.step(next(written), total)

    records = {key[:2]: _write_split(out, *key, image_size, seed, tick) for key in plan}
    bar.close()
    pretrain_name = pretrain_spec.name
    task_records = [r for (name, _), rs in records.items() if name != pretrain_name for r in rs]
    write_manifest(out / "manifest.jsonl", task_records)
    write_manifest(
        out / "pretrain.jsonl", records[pretrain_name, "train"] + records[pretrain_name, "test"]
    )
    write_task_similarity(out, {task.name: families(task) for task in chosen}, SOURCE)
    summary = _summary(records, suite, chosen, sizes, pretrain, image_size, seed)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    atomic.write_json(out / "synthetic.json", summary)
    return summary


OUTPUTS = ("manifest.jsonl", "pretrain.jsonl", "task_families.json", "task_similarity.json")
SOURCE = (
    "synthetic: Jaccard of the attribute families each task's captions vary beyond shape and colour"
)


def write_task_similarity(out: Path, task_families: dict[str, frozenset[str]], source: str) -> None:
    """task_families.json (task -> its families, for combining datasets) and the true task
    similarity, task_similarity.json (through `lpi.continual.similarity.write_similarity`, the
    format the trainer reads), both beside manifest.jsonl."""
    atomic.write_json(
        out / "task_families.json", {task: sorted(f) for task, f in task_families.items()}
    )
    matrix = similarity_matrix(task_families)
    write_similarity(out / "task_similarity.json", list(task_families), matrix, source)


def _write_split(
    out: Path, name: str, split: str, count: int, size: int, seed: int, tick: Callable[[], None]
) -> list[Record]:
    folder = out / "images" / name / split
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index, scene in enumerate(make_scenes(name, split, count, seed)):
        path = folder / f"{index:05d}.png"
        render(scene, size).save(path, compress_level=1)
        records.append(Record(path, scene.captions, name, split))
        tick()
    return records


def _summary(
    records: dict,
    suite: str,
    tasks: tuple[TaskSpec, ...],
    sizes: tuple[tuple[str, int], ...],
    pretrain: int,
    size: int,
    seed: int,
) -> dict:
    names = [task.name for task in tasks]
    summary = {
        "seed": seed,
        "image_size": size,
        "tasks": names,
        **{f"{split}_per_task": n for split, n in sizes},
        "pretrain": pretrain,
        "captions_per_image": CAPTIONS_PER_IMAGE,
        "combinations": {name: len(combinations(name)) for name in (SUITES[suite][0].name, *names)},
        "unique_test_captions": {
            name: round(unique_fraction(rs), 4)
            for (name, split), rs in records.items()
            if split == "test"
        },
    }
    if suite != "classic":  # the classic summary stays as it was, byte for byte
        summary = {"suite": suite, **summary}
    else:
        del summary["val_per_task"]
    return summary


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lpi.continual.data.synthetic",
        description="Write a synthetic continual retrieval dataset: PNGs and JSONL manifests.",
    )
    parser.add_argument("--out", required=True, help="output folder")
    suites = "; ".join(
        f"{name}: {', '.join(t.name for t in tasks)} (train/val/test {'/'.join(map(str, n))})"
        for name, (_, tasks, n) in SUITES.items()
    )
    parser.add_argument(
        "--suite",
        choices=tuple(SUITES),
        default="classic",
        help=f"task set (default classic). {suites}",
    )
    parser.add_argument("--tasks", type=int, help="the suite's first N tasks (default: all)")
    parser.add_argument("--train-per-task", type=int, help="default: the suite's")
    parser.add_argument(
        "--val-per-task", type=int, help="default: the suite's; distinct combinations like test"
    )
    parser.add_argument(
        "--test-per-task",
        type=int,
        help="default: the suite's; pretrain gets at most one per shape-colour pair",
    )
    parser.add_argument(
        "--pretrain", type=int, default=4000, help="pretraining images (default 4000)"
    )
    parser.add_argument("--image-size", type=int, default=64, help="pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="of everything drawn (default 0)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = generate(
        args.out,
        args.tasks,
        args.train_per_task,
        args.test_per_task,
        args.pretrain,
        args.image_size,
        args.seed,
        progress=True,
        suite=args.suite,
        val_per_task=args.val_per_task,
    )
    for name, fraction in summary["unique_test_captions"].items():
        combos = summary["combinations"][name]
        print(f"{name}: {combos} combinations, unique test captions {fraction:.1%}")
    print(f"wrote {args.out}/manifest.jsonl and pretrain.jsonl in {summary['seconds']:.1f} s")


if __name__ == "__main__":
    main()
