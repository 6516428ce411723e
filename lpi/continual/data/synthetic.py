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

Test images draw distinct attribute combinations (without replacement), so no two test images
of a task share a caption's meaning and recall@1 is well defined. Everything is a function of
the seed.

    python -m lpi.continual.data.synthetic --out data/synthetic --tasks 4 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import logging
import math
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
from lpi.continual.data.synthetic_tasks import (  # re-exported: the benchmark's vocabulary
    COLOURS,
    POSITIONS,
    PRETRAIN,
    TASK_NAMES,
    TASKS,
    TaskSpec,
    pretrain_extras,
    task_spec,
)

log = logging.getLogger(__name__)

_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou])")
MIN_CONTRAST = 90.0  # RGB distance below which an object colour is not drawn on a ground
CAPTIONS_PER_IMAGE = 3


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
    colours = [attrs[key] for key in ("colour", "colour2") if key in attrs]
    if any(math.dist(COLOURS[c], ground) < MIN_CONTRAST for c in colours):
        return False
    if "shape2" in attrs:  # two identical objects would be "two red circles"
        return (attrs["shape"], attrs["colour"]) != (attrs["shape2"], attrs["colour2"])
    return True


def captions_for(
    task: TaskSpec, attrs: dict, rng: np.random.Generator, count: int
) -> tuple[str, ...]:
    """`count` captions from distinct templates; each names every attribute of the scene."""
    where = POSITIONS[attrs["position"]][1] if "position" in attrs else ""
    if task is PRETRAIN:  # optional attributes: adjectives and a trailing position phrase
        where = " " + where if where else ""
    adjectives = "".join(f"{attrs[key]} " for key in ("size", "texture") if key in attrs)
    chosen = rng.choice(len(task.templates), size=min(count, len(task.templates)), replace=False)
    return tuple(
        with_articles(task.templates[i].format(**attrs, where=where, adjectives=adjectives))
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
    picks = (
        _distinct(rng, len(pool), count, name) if split == "test" else _any(rng, len(pool), count)
    )
    scenes = []
    for index in picks:
        attrs = dict(pool[index])  # a copy: the pool is cached
        if task is PRETRAIN:
            attrs = pretrain_extras(attrs, rng)
        ground, style = task.ground(attrs, rng)
        things = task.compose(attrs, rng)
        captions = captions_for(task, attrs, rng, captions_per_image)
        scenes.append(Scene(ground, style, things, attrs, captions, int(rng.integers(2**31))))
    return scenes


def _stable_id(text: str) -> int:
    """A seed component from a name that, unlike hash(), is the same in every process."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _distinct(rng: np.random.Generator, size: int, count: int, name: str) -> np.ndarray:
    if count > size:
        log.warning("%s: %d test images but only %d distinct combinations", name, count, size)
    rounds = -(-count // size)
    return np.concatenate([rng.permutation(size) for _ in range(rounds)])[:count]


def _any(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    return rng.integers(size, size=count)


# --- the dataset on disk -----------------------------------------------------------------------


def unique_fraction(records: list[Record]) -> float:
    """Fraction of captions that occur exactly once among these records' captions."""
    counts = Counter(caption for record in records for caption in record.captions)
    total = sum(counts.values())
    return sum(n == 1 for n in counts.values()) / total if total else 1.0


def generate(
    out: str | Path,
    tasks: int = len(TASKS),
    train_per_task: int = 1000,
    test_per_task: int = 200,
    pretrain: int = 4000,
    image_size: int = 64,
    seed: int = 0,
    progress: bool = False,
    control: Control = NO_CONTROL,
) -> dict:
    """Write PNGs, manifest.jsonl (tasks), pretrain.jsonl, synthetic.json; return the summary.

    `control` is stepped after each image: cancelling it stops between two images.
    """
    if not 1 <= tasks <= len(TASKS):
        raise ValueError(f"tasks must be in 1..{len(TASKS)}, got {tasks}")
    if min(train_per_task, pretrain) < 1 or test_per_task < 0:
        raise ValueError("train_per_task and pretrain must be >= 1, test_per_task >= 0")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("manifest.jsonl", "pretrain.jsonl", "synthetic.json"):
        (out / name).unlink(missing_ok=True)  # no stale manifest over half-rewritten images
    plan = [
        (task.name, split, n)
        for task in TASKS[:tasks]
        for split, n in (("train", train_per_task), ("test", test_per_task))
    ]
    # One pretrain test image per shape-colour pair at most, so its captions stay unique.
    pretrain_test = min(test_per_task, len(combinations("pretrain")))
    plan += [("pretrain", "train", pretrain), ("pretrain", "test", pretrain_test)]
    start = time.perf_counter()
    total = sum(n for *_, n in plan)
    bar = tqdm(total=total, unit="img", disable=None if progress else True)
    written = itertools.count(1)

    def tick() -> None:
        bar.update()
        control.step(next(written), total)

    records = {key[:2]: _write_split(out, *key, image_size, seed, tick) for key in plan}
    bar.close()
    task_records = [r for (name, _), rs in records.items() if name != "pretrain" for r in rs]
    write_manifest(out / "manifest.jsonl", task_records)
    write_manifest(
        out / "pretrain.jsonl", records["pretrain", "train"] + records["pretrain", "test"]
    )
    summary = _summary(records, tasks, train_per_task, test_per_task, pretrain, image_size, seed)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    atomic.write_json(out / "synthetic.json", summary)
    return summary


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
    records: dict, tasks: int, train: int, test: int, pretrain: int, size: int, seed: int
) -> dict:
    return {
        "seed": seed,
        "image_size": size,
        "tasks": list(TASK_NAMES[:tasks]),
        "train_per_task": train,
        "test_per_task": test,
        "pretrain": pretrain,
        "captions_per_image": CAPTIONS_PER_IMAGE,
        "combinations": {
            name: len(combinations(name)) for name in ("pretrain", *TASK_NAMES[:tasks])
        },
        "unique_test_captions": {
            name: round(unique_fraction(rs), 4)
            for (name, split), rs in records.items()
            if split == "test"
        },
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lpi.continual.data.synthetic",
        description="Write a synthetic continual retrieval dataset: PNGs and JSONL manifests.",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--tasks", type=int, default=len(TASKS), help=f"1..{len(TASKS)}: {', '.join(TASK_NAMES)}"
    )
    parser.add_argument("--train-per-task", type=int, default=1000)
    parser.add_argument(
        "--test-per-task",
        type=int,
        default=200,
        help="per task; pretrain gets at most one per shape-colour pair",
    )
    parser.add_argument(
        "--pretrain", type=int, default=4000, help="pretraining images (no backgrounds, one object)"
    )
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
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
    )
    for name, fraction in summary["unique_test_captions"].items():
        combos = summary["combinations"][name]
        print(f"{name}: {combos} combinations, unique test captions {fraction:.1%}")
    print(f"wrote {args.out}/manifest.jsonl and pretrain.jsonl in {summary['seconds']:.1f} s")


if __name__ == "__main__":
    main()
