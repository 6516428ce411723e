"""A small real-image benchmark from Fashion-MNIST (Debian's `dataset-fashion-mnist` package).

Fashion-MNIST has ten classes and no captions, and a caption that only names the class would be
shared by hundreds of test images, so recall@1 would mean nothing. Each garment is therefore
tinted with a named colour over a named background ("a red sneaker on a teal background"); test
images draw distinct (class, colour, background) combinations. Shapes and textures are real,
colours are synthetic. Tasks are groups of classes: tops, footwear, other.

The IDX files are read from the package's install path (or --root); nothing is downloaded.

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
from lpi.continual.data.synthetic import MIN_CONTRAST, unique_fraction, with_articles
from lpi.continual.data.synthetic_tasks import BACKGROUNDS, COLOURS

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
        f"{root / stem}(.gz) not found: install Debian's dataset-fashion-mnist or pass --root"
    )


def combinations(task: str) -> list[dict]:
    """(class, colour, background) triples of a task with enough contrast to see the garment."""
    result = []
    for label, colour, ground in itertools.product(TASKS[task], COLOURS, BACKGROUNDS):
        if math.dist(COLOURS[colour], BACKGROUNDS[ground]) >= MIN_CONTRAST:
            result.append({"label": label, "colour": colour, "background": ground})
    return result


def tint(image: np.ndarray, colour: str, background: str) -> Image.Image:
    """A [28, 28] grey garment (white on black) -> RGB: the garment in colour over background."""
    alpha = image.astype(np.float32)[..., None] / 255.0  # [28, 28, 1]
    rgb = alpha * np.array(COLOURS[colour]) + (1 - alpha) * np.array(BACKGROUNDS[background])
    return Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), "RGB")


def captions(attrs: dict) -> tuple[str, ...]:
    """One caption per template; each names the class, the colour and the background."""
    words = {**attrs, "garment": CLASSES[attrs["label"]]}
    return tuple(with_articles(template.format(**words)) for template in TEMPLATES)


def _plan(
    task: str, split: str, count: int, labels: np.ndarray, rng: np.random.Generator
) -> list[tuple[int, dict]]:
    """(image index, attributes) pairs: distinct combinations for test, images never reused."""
    pool = combinations(task)
    if split == "test" and count > len(pool):
        log.warning("%s: %d test images but only %d distinct combinations", task, count, len(pool))
    if split == "test":
        picks = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-count // len(pool)))])
    else:
        picks = rng.integers(len(pool), size=count)
    unused = {
        label: iter(rng.permutation(np.flatnonzero(labels == label))) for label in TASKS[task]
    }
    plan = []
    for pick in picks[:count]:
        attrs = pool[pick]
        index = next(unused[attrs["label"]], None)
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
) -> dict[str, float]:
    """Write PNGs and manifest.jsonl; return each task's fraction of unique test captions."""
    out = Path(out)
    (out / "manifest.jsonl").unlink(missing_ok=True)
    records, unique = [], {}
    for split, count in (("train", train_per_task), ("test", test_per_task)):
        images, labels = load_split(root, split)
        for number, task in enumerate(TASKS):
            rng = np.random.default_rng([seed, number, split == "test"])
            folder = out / "images" / task / split
            folder.mkdir(parents=True, exist_ok=True)
            split_records = []
            for position, (index, attrs) in enumerate(_plan(task, split, count, labels, rng)):
                path = folder / f"{position:05d}.png"
                tint(images[index], attrs["colour"], attrs["background"]).save(path)
                split_records.append(Record(path, captions(attrs), task, split))
            records += split_records
            if split == "test":
                unique[task] = unique_fraction(split_records)
    order = {task: rank for rank, task in enumerate(TASKS)}
    write_manifest(out / "manifest.jsonl", sorted(records, key=lambda r: order[r.task]))
    return unique


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lpi.continual.data.fashion_mnist",
        description="Tinted Fashion-MNIST with captions: three class-group tasks.",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="folder of the IDX files")
    parser.add_argument("--train-per-task", type=int, default=1000)
    parser.add_argument("--test-per-task", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    unique = generate(args.out, args.root, args.train_per_task, args.test_per_task, args.seed)
    for task, fraction in unique.items():
        print(
            f"{task}: {len(combinations(task))} combinations, unique test captions {fraction:.1%}"
        )
    print(f"wrote {args.out}/manifest.jsonl")


if __name__ == "__main__":
    main()
