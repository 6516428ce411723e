"""A small real-image benchmark from Fashion-MNIST (Debian's `dataset-fashion-mnist` package).

Fashion-MNIST has ten classes and no captions, and a caption that only names the class would be
shared by hundreds of test images, so recall@1 would mean nothing. Each garment is therefore
tinted with a named colour over a named background ("a red sneaker on a teal background"); test
images draw distinct (class, colour, background) combinations. Shapes and textures are real,
colours are synthetic. Tasks are groups of classes: tops, footwear, other. A val split, when
asked for, draws distinct combinations from training-file images that train does not use.

Every group's captions vary garment, colour and background; colour is the object's, as in the
synthetic tasks, so a group's families are its own garments and "background"
(`task_families`): two groups are 1/3 similar, and each is 1/3 similar to a synthetic task
about backgrounds. The generator writes task_families.json and task_similarity.json beside
the manifest; `lpi.continual.data.combine` appends these tasks to a synthetic set.

A pretraining split (pretrain.jsonl, asked for with `pretrain`) teaches a backbone every garment
word: training-file images that no task's train or val split uses, of all ten classes, each
tinted with a random colour over a named background (4 in 10) or an unnamed random one, with
three captions in varied phrasings. `lpi.continual.data.combine` adds it to the synthetic
pretraining set, so no word a task uses keeps its random initial embedding.

The IDX files are read from the package's install path (or --root); nothing is downloaded.
Where they are absent the CLI says so, naming the package, and exits with status 2.

    sudo apt-get install dataset-fashion-mnist
    python -m lpi.continual.data.fashion_mnist --out data/fashion --seed 0
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image

from lpi.continual.data.manifest import Record, write_manifest
from lpi.continual.data.synthetic import (
    draw_picks,
    unique_fraction,
    with_articles,
    write_task_similarity,
)
from lpi.continual.data.synthetic_tasks import BACKGROUNDS, COLOURS, contrasts

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": "train", "test": "t10k"}  # our split -> the IDX files' prefix
CLASSES = (
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
TASKS = {"tops": (0, 2, 4, 6), "footwear": (5, 7, 9), "other": (1, 3, 8)}
TEMPLATES = (
    "a {colour} {garment} on a {background} background",
    "a photo of a {colour} {garment} against {background}",
    "a {background} background with a {colour} {garment}",
)
_IDX_TYPES = {0x08: np.uint8}
PACKAGE = "dataset-fashion-mnist"  # Debian's package of the IDX files
SOURCE = "fashion-mnist: Jaccard of each group's families (its garments, background)"


def task_families(task: str) -> frozenset[str]:
    """A group's families beyond the object's colour: its own garments and the background."""
    return frozenset({f"garments ({task})", "background"})


def available(root: str | Path = DEFAULT_ROOT) -> bool:
    """Whether the four IDX files are there (else install PACKAGE or pass another root)."""
    try:
        for prefix in FILES.values():
            _find(Path(root), f"{prefix}-images-idx3-ubyte")
            _find(Path(root), f"{prefix}-labels-idx1-ubyte")
    except FileNotFoundError:
        return False
    return True


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzipped or not) -> array; unsigned-byte data only, as Fashion-MNIST uses."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * dims)
    if body.size != math.prod(shape):
        raise ValueError(f"{path}: header says {shape}, body holds {body.size} values")
    return body.reshape(shape)


def load_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 28, 28] uint8 and labels [N] of one split."""
    root = Path(root)
    images = read_idx(_find(root, f"{FILES[split]}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{FILES[split]}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{root}: {split} images {images.shape} do not match labels {labels.shape}"
        )
    return images, labels


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"{root / stem}(.gz) not found: install Debian's {PACKAGE} or pass --root"
    )


def combinations(task: str) -> list[dict]:
    """(class, colour, background) triples of a task with enough contrast to see the garment."""
    result = []
    for label, colour, ground in itertools.product(TASKS[task], COLOURS, BACKGROUNDS):
        if contrasts({"colour": colour}, BACKGROUNDS[ground]):
            result.append({"label": label, "colour": colour, "background": ground})
    return result


def tint(image: np.ndarray, colour: str, background: str) -> Image.Image:
    """A [28, 28] grey garment (white on black) -> RGB: the garment in colour over background."""
    return blend(image, COLOURS[colour], BACKGROUNDS[background])


def blend(image: np.ndarray, colour: tuple[int, ...], ground: tuple[int, ...]) -> Image.Image:
    """A [28, 28] grey garment -> RGB: the garment in one colour over a ground colour."""
    alpha = image.astype(np.float32)[..., None] / 255.0  # [28, 28, 1]
    rgb = alpha * np.array(colour) + (1 - alpha) * np.array(ground)
    return Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), "RGB")


def captions(attrs: dict) -> tuple[str, ...]:
    """One caption per template; each names the class, the colour and the background."""
    words = {**attrs, "garment": CLASSES[attrs["label"]]}
    return tuple(with_articles(template.format(**words)) for template in TEMPLATES)


def _plan(
    task: str,
    split: str,
    count: int,
    labels: np.ndarray,
    rng: np.random.Generator,
    walks: dict | None = None,
) -> list[tuple[int, dict]]:
    """(image index, attributes) pairs: distinct combinations for val and test, images never
    reused. `walks` (label -> iterator over its images) is filled when empty and consumed, so
    a later split that passes the same dict never reuses an image of an earlier one."""
    pool = combinations(task)
    picks = draw_picks(rng, len(pool), count, task, split)
    walks = {} if walks is None else walks
    if not walks:
        walks.update(
            {label: iter(rng.permutation(np.flatnonzero(labels == label))) for label in TASKS[task]}
        )
    plan = []
    for pick in picks:
        attrs = pool[pick]
        index = next(walks[attrs["label"]], None)
        if index is None:
            raise ValueError(f"{task}/{split}: not enough {CLASSES[attrs['label']]} images")
        plan.append((int(index), attrs))
    return plan


def generate(
    out: str | Path,
    root: str | Path = DEFAULT_ROOT,
    train_per_task: int = 1000,
    test_per_task: int = 100,
    seed: int = 0,
    val_per_task: int = 0,
    pretrain: int = 0,
) -> dict[str, float]:
    """Write PNGs, manifest.jsonl, task_families.json and task_similarity.json (and, with
    `pretrain` > 0, pretrain.jsonl); return each task's fraction of unique test captions. Val
    and pretraining images come from the training file, never one that train (or val) uses;
    train and test draw exactly as they did before val and pretraining existed."""
    if pretrain < 0:
        raise ValueError(f"pretrain must be >= 0, got {pretrain}")
    out = Path(out)
    (out / "manifest.jsonl").unlink(missing_ok=True)
    (out / "pretrain.jsonl").unlink(missing_ok=True)
    records, unique = [], {}
    taken: set[int] = set()  # training-file images that train and val use
    splits = (("train", train_per_task), ("val", val_per_task), ("test", test_per_task))
    for split, count in splits:
        if split == "val" and not count:
            continue
        images, labels = load_split(root, "train" if split == "val" else split)
        for number, task in enumerate(TASKS):
            rng = np.random.default_rng([seed, number, split == "test"])
            walks: dict = {}
            if split == "val":  # replay train's walk through the file: no image reused
                _plan(task, "train", train_per_task, labels, rng, walks)
                rng = np.random.default_rng([seed, number, 2])
            folder = out / "images" / task / split
            folder.mkdir(parents=True, exist_ok=True)
            split_records = []
            plan = _plan(task, split, count, labels, rng, walks)
            if split != "test":
                taken.update(index for index, _ in plan)
            for position, (index, attrs) in enumerate(plan):
                path = folder / f"{position:05d}.png"
                tint(images[index], attrs["colour"], attrs["background"]).save(path)
                split_records.append(Record(path, captions(attrs), task, split))
            records += split_records
            if split == "test":
                unique[task] = unique_fraction(split_records)
    if pretrain:
        write_manifest(out / "pretrain.jsonl", _pretraining(out, root, pretrain, seed, taken))
    order = {task: rank for rank, task in enumerate(TASKS)}
    write_manifest(out / "manifest.jsonl", sorted(records, key=lambda r: order[r.task]))
    write_task_similarity(out, {task: task_families(task) for task in TASKS}, SOURCE)
    return unique


PRETRAIN_TASK = "pretrain-fashion"
NAMED_GROUND = 0.4  # chance that a pretraining image's background is named (and drawn)
_OPENINGS = ("a ", "a photo of a ", "a picture of a ", "there is a ")
_GROUNDS = (
    " on a {background} background",
    " against {background}",
    " against a {background} background",
)


def _pretraining(
    out: Path, root: str | Path, count: int, seed: int, taken: set[int]
) -> list[Record]:
    """`count` pretraining records, the ten classes in turn, from training-file images outside
    `taken`; ValueError where a class runs out."""
    images, labels = load_split(root, "train")
    rng = np.random.default_rng([seed, 7, 7])
    free = {
        label: [i for i in rng.permutation(np.flatnonzero(labels == label)) if i not in taken]
        for label in range(len(CLASSES))
    }
    folder = out / "images" / PRETRAIN_TASK / "train"
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for position in range(count):
        label = position % len(CLASSES)
        if position // len(CLASSES) >= len(free[label]):
            raise ValueError(f"pretraining: not enough unused {CLASSES[label]} images")
        index = free[label][position // len(CLASSES)]
        colour = str(rng.choice(list(COLOURS)))
        named = rng.random() < NAMED_GROUND
        palette = [g for g in BACKGROUNDS if contrasts({"colour": colour}, BACKGROUNDS[g])]
        background = str(rng.choice(palette)) if named else None
        ground = BACKGROUNDS[background] if background else _unnamed_ground(colour, rng)
        path = folder / f"{position:05d}.png"
        blend(images[index], COLOURS[colour], ground).save(path)
        texts = tuple(
            _pretraining_caption(CLASSES[label], colour, background, rng) for _ in range(3)
        )
        records.append(Record(path, texts, PRETRAIN_TASK, "train"))
    return records


def _unnamed_ground(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """A random ground the garment's colour stands out from (mid grey after 100 misses)."""
    for _ in range(100):
        r, g, b = (int(c) for c in rng.integers(0, 256, size=3))
        if contrasts({"colour": colour}, (r, g, b)):
            return r, g, b
    return (125, 125, 125)


def _pretraining_caption(
    garment: str, colour: str, background: str | None, rng: np.random.Generator
) -> str:
    """The garment, usually its colour, and the background when it is named."""
    noun = garment if rng.random() < 0.2 else f"{colour} {garment}"
    text = str(rng.choice(_OPENINGS)) + noun
    if background:
        text += str(rng.choice(_GROUNDS)).format(background=background)
    return with_articles(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lpi.continual.data.fashion_mnist",
        description="Tinted Fashion-MNIST with captions: three class-group tasks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="folder of the IDX files")
    parser.add_argument("--train-per-task", type=int, default=1000)
    parser.add_argument("--val-per-task", type=int, default=100)
    parser.add_argument("--test-per-task", type=int, default=100)
    parser.add_argument("--pretrain", type=int, default=0, help="pretraining images (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not available(args.root):
        log.error("no Fashion-MNIST IDX files in %s: install Debian's %s", args.root, PACKAGE)
        return 2
    unique = generate(
        args.out,
        args.root,
        args.train_per_task,
        args.test_per_task,
        args.seed,
        args.val_per_task,
        args.pretrain,
    )
    for task, fraction in unique.items():
        print(
            f"{task}: {len(combinations(task))} combinations, unique test captions {fraction:.1%}"
        )
    print(f"wrote {args.out}/manifest.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
