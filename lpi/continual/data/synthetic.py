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
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from lpi import atomic
from lpi.continual.data.manifest import Record, write_manifest

log = logging.getLogger(__name__)

RGB = tuple[int, int, int]

COLOURS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (40, 170, 40),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 190),
    "orange": (250, 140, 20),
    "pink": (250, 120, 190),
    "cyan": (40, 210, 220),
    "white": (245, 245, 245),
    "brown": (130, 80, 35),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart")
TEXTURES = ("plain", "striped", "spotted", "checked", "wavy")
SIZES = {"small": 0.10, "medium": 0.16, "large": 0.27}  # object radius / image side
POSITIONS = {  # name -> (centre x, centre y) / image side, and the caption's phrase
    "top left": ((0.22, 0.22), "in the top left"),
    "top": ((0.5, 0.22), "at the top"),
    "top right": ((0.78, 0.22), "in the top right"),
    "left": ((0.22, 0.5), "on the left"),
    "centre": ((0.5, 0.5), "in the centre"),
    "right": ((0.78, 0.5), "on the right"),
    "bottom left": ((0.22, 0.78), "in the bottom left"),
    "bottom": ((0.5, 0.78), "at the bottom"),
    "bottom right": ((0.78, 0.78), "in the bottom right"),
}
BACKGROUNDS: dict[str, RGB] = {  # the named grounds of "sizes-backgrounds"
    "beige": (225, 205, 160),
    "olive": (110, 120, 40),
    "teal": (20, 110, 110),
    "maroon": (110, 25, 40),
    "lavender": (190, 170, 225),
    "mint": (170, 225, 190),
}
_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou])")
MIN_CONTRAST = 90.0  # RGB distance below which an object colour is not drawn on a ground
CAPTIONS_PER_IMAGE = 3


@dataclass(frozen=True)
class Thing:
    """One drawn object; centre and radius are fractions of the image side."""

    shape: str
    rgb: RGB
    texture: str
    centre: tuple[float, float]
    radius: float
    angle: float  # degrees


@dataclass(frozen=True)
class Scene:
    """One image: its ground, its objects, the attributes its captions name, and captions."""

    ground: RGB
    style: str  # "plain" or "grid"
    things: tuple[Thing, ...]
    attributes: dict[str, str]
    captions: tuple[str, ...]
    seed: int  # of the ground's pixel noise


@dataclass(frozen=True)
class TaskSpec:
    """A task: the attribute families its captions name, its templates, its ground."""

    name: str
    families: tuple[tuple[str, tuple[str, ...]], ...]
    templates: tuple[str, ...]
    ground: Callable[[dict, np.random.Generator], tuple[RGB, str]]
    compose: Callable[[dict, np.random.Generator], tuple[Thing, ...]]
    nominal_ground: Callable[[dict], RGB]


# --- grounds and objects of each task ----------------------------------------------------------


def _grey(attrs: dict, rng: np.random.Generator) -> tuple[RGB, str]:
    v = int(rng.integers(70, 181))
    return (v, v, v), "plain"


def _dark(attrs: dict, rng: np.random.Generator) -> tuple[RGB, str]:
    v = int(rng.integers(10, 41))
    return (v, v, v + 20), "plain"


def _light(attrs: dict, rng: np.random.Generator) -> tuple[RGB, str]:
    v = int(rng.integers(215, 246))
    return (v, v, v - 12), "plain"


def _slate(attrs: dict, rng: np.random.Generator) -> tuple[RGB, str]:
    return _jitter((70, 80, 95), rng, 10), "grid"


def _named(attrs: dict, rng: np.random.Generator) -> tuple[RGB, str]:
    return _jitter(BACKGROUNDS[attrs["background"]], rng, 10), "plain"


def _jitter(rgb: RGB, rng: np.random.Generator, amount: int) -> RGB:
    noise = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(c) for c in np.clip(np.array(rgb) + noise, 0, 255))


def _thing(attrs: dict, rng, centre, size: str, texture: str, suffix: str = "") -> Thing:
    return Thing(
        shape=attrs["shape" + suffix],
        rgb=_jitter(COLOURS[attrs["colour" + suffix]], rng, 15),
        texture=texture,
        centre=centre,
        radius=SIZES[size] * float(rng.uniform(0.9, 1.1)),
        angle=float(rng.uniform(-12, 12)),
    )


def _anywhere(size: str, rng: np.random.Generator) -> tuple[float, float]:
    margin = SIZES[size] * 1.1 + 0.02
    return tuple(float(v) for v in rng.uniform(margin, 1 - margin, size=2))


def _pretrain_extras(attrs: dict, rng: np.random.Generator) -> dict:
    """Size, texture and position, each named with probability PRETRAIN_NAMING[family]."""
    named = {key: bool(rng.random() < p) for key, p in PRETRAIN_NAMING.items()}
    extras = {}
    if named["position"]:
        extras["position"] = str(rng.choice(list(POSITIONS)))
    if named["size"]:  # a large object does not fit a named corner
        extras["size"] = str(rng.choice(("small", "medium") if named["position"] else list(SIZES)))
    if named["texture"]:
        extras["texture"] = str(rng.choice(TEXTURES))
    return attrs | extras


def _pretrain_things(attrs: dict, rng: np.random.Generator) -> tuple[Thing, ...]:
    """Unnamed attributes stay plain, medium or large, anywhere (so shape is easy to learn)."""
    default = ("medium",) if "position" in attrs else PRETRAIN_SIZES
    size = attrs.get("size") or str(rng.choice(default))
    if "position" in attrs:
        x, y = POSITIONS[attrs["position"]][0]
        centre = (x + rng.uniform(-0.03, 0.03), y + rng.uniform(-0.03, 0.03))
    else:
        centre = _anywhere(size, rng)
    return (_thing(attrs, rng, centre, size, attrs.get("texture", "plain")),)


def _pair_things(attrs: dict, rng: np.random.Generator) -> tuple[Thing, ...]:
    left = (0.27 + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.12, 0.12))
    right = (0.73 + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.12, 0.12))
    return (
        _thing(attrs, rng, left, "medium", "plain"),
        _thing(attrs, rng, right, "medium", "plain", suffix="2"),
    )


def _texture_things(attrs: dict, rng: np.random.Generator) -> tuple[Thing, ...]:
    centre = _anywhere(attrs["size"], rng)
    return (_thing(attrs, rng, centre, attrs["size"], attrs["texture"]),)


def _position_things(attrs: dict, rng: np.random.Generator) -> tuple[Thing, ...]:
    x, y = POSITIONS[attrs["position"]][0]
    centre = (x + rng.uniform(-0.03, 0.03), y + rng.uniform(-0.03, 0.03))
    return (_thing(attrs, rng, centre, attrs["size"], "plain"),)


def _centred_things(attrs: dict, rng: np.random.Generator) -> tuple[Thing, ...]:
    centre = tuple(float(v) for v in 0.5 + rng.uniform(-0.08, 0.08, size=2))
    return (_thing(attrs, rng, centre, attrs["size"], "plain"),)


SHAPE_COLOUR = (("shape", SHAPES), ("colour", tuple(COLOURS)))
PRETRAIN_SIZES = ("medium", "large")  # unnamed sizes: big enough for a tiny ViT to learn shape
PRETRAIN_NAMING = {"size": 0.4, "texture": 0.4, "position": 0.4}  # chance each is named
PRETRAIN = TaskSpec(
    name="pretrain",
    families=SHAPE_COLOUR,
    templates=(  # {adjectives}: the named size and texture; {where}: the named position
        "a {adjectives}{colour} {shape}{where}",
        "a picture of a {adjectives}{colour} {shape}{where}",
        "a {adjectives}{shape} in {colour}{where}",
        "a {adjectives}{colour} {shape} shape{where}",
    ),
    ground=_grey,
    compose=_pretrain_things,
    nominal_ground=lambda attrs: (125, 125, 125),
)
TASKS = (
    TaskSpec(
        name="shapes-colours",
        families=(*SHAPE_COLOUR, ("shape2", SHAPES), ("colour2", tuple(COLOURS))),
        templates=(
            "a {colour} {shape} and a {colour2} {shape2}",
            "a {colour} {shape} next to a {colour2} {shape2}",
            "a {colour} {shape} on the left and a {colour2} {shape2} on the right",
            "a {colour2} {shape2} to the right of a {colour} {shape}",
        ),
        ground=_dark,
        compose=_pair_things,
        nominal_ground=lambda attrs: (25, 25, 45),
    ),
    TaskSpec(
        name="textures",
        families=(*SHAPE_COLOUR, ("texture", TEXTURES), ("size", ("medium", "large"))),
        templates=(
            "a {size} {texture} {colour} {shape}",
            "a {size} {colour} {shape} with a {texture} pattern",
            "a {texture} {colour} {shape}, {size} in size",
            "a picture of a {size} {colour} {shape} that is {texture}",
        ),
        ground=_light,
        compose=_texture_things,
        nominal_ground=lambda attrs: (230, 230, 218),
    ),
    TaskSpec(
        name="positions",
        families=(*SHAPE_COLOUR, ("position", tuple(POSITIONS)), ("size", ("small", "medium"))),
        templates=(
            "a {size} {colour} {shape} {where}",
            "{where} there is a {size} {colour} {shape}",
            "a {size} {shape} coloured {colour} {where}",
            "a picture with a {size} {colour} {shape} {where}",
        ),
        ground=_slate,
        compose=_position_things,
        nominal_ground=lambda attrs: (70, 80, 95),
    ),
    TaskSpec(
        name="sizes-backgrounds",
        families=(*SHAPE_COLOUR, ("size", tuple(SIZES)), ("background", tuple(BACKGROUNDS))),
        templates=(
            "a {size} {colour} {shape} on a {background} background",
            "a {background} background with a {size} {colour} {shape}",
            "a {size} {shape} coloured {colour} on {background}",
            "a picture of a {size} {colour} {shape} against a {background} background",
        ),
        ground=_named,
        compose=_centred_things,
        nominal_ground=lambda attrs: BACKGROUNDS[attrs["background"]],
    ),
)
TASK_NAMES = tuple(task.name for task in TASKS)


def task_spec(name: str) -> TaskSpec:
    for task in (PRETRAIN, *TASKS):
        if task.name == name:
            return task
    raise ValueError(
        f"unknown synthetic task {name!r}; choose from pretrain, {', '.join(TASK_NAMES)}"
    )


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
            attrs = _pretrain_extras(attrs, rng)
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


# --- drawing -----------------------------------------------------------------------------------


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """The shape's outline in unit coordinates (y down), about the same visual area each."""
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a) + 0.15) for a in _angles(3, -90)]
    if shape == "diamond":
        return [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
    if shape == "hexagon":
        return [(0.95 * math.cos(a), 0.95 * math.sin(a)) for a in _angles(6, 0)]
    if shape == "star":
        radii = (1.0, 0.45) * 5
        return [
            (r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, _angles(10, -90), strict=True)
        ]
    if shape == "cross":
        w = 0.33
        return [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ]
    if shape == "heart":
        return _heart()
    raise ValueError(f"unknown shape {shape!r}")


def _angles(count: int, start_degrees: float) -> list[float]:
    return [math.radians(start_degrees + 360 * k / count) for k in range(count)]


@cache
def _heart() -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    y = y - (y.max() + y.min()) / 2
    scale = 0.95 / max(np.abs(x).max(), np.abs(y).max())
    return [(float(a * scale), float(b * scale)) for a, b in zip(x, y, strict=True)]


def _mask(thing: Thing, size: int) -> np.ndarray:
    """Boolean [S, S]: the pixels the object covers."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = thing.centre[0] * size, thing.centre[1] * size, thing.radius * size
    if thing.shape == "circle":
        draw.ellipse([cx - 0.9 * r, cy - 0.9 * r, cx + 0.9 * r, cy + 0.9 * r], fill=1)
    else:
        cos, sin = math.cos(math.radians(thing.angle)), math.sin(math.radians(thing.angle))
        points = [
            (cx + r * (u * cos - v * sin), cy + r * (u * sin + v * cos))
            for u, v in _unit_polygon(thing.shape)
        ]
        draw.polygon(points, fill=1)
    return np.asarray(canvas, dtype=bool)


def _pattern(texture: str, size: int, origin: tuple[float, float]) -> np.ndarray | None:
    """Boolean [S, S]: the pixels in the darker second colour (None for plain)."""
    if texture == "plain":
        return None
    half = max(2, round(size / 16))  # stripe width; a period is 2 * half
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    x, y = x - origin[0], y - origin[1]
    if texture == "striped":
        return (y // half) % 2 == 1
    if texture == "checked":
        return ((x // half) + (y // half)) % 2 == 1
    if texture == "wavy":
        return ((y + half * np.sin(0.5 * np.pi * x / half)) // half) % 2 == 1
    if texture == "spotted":
        period = 2 * half
        dx, dy = x % period - half, y % period - half
        return dx * dx + dy * dy <= (0.6 * half) ** 2
    raise ValueError(f"unknown texture {texture!r}")


def _ground(scene: Scene, size: int) -> np.ndarray:
    """Float [S, S, 3]: the ground colour, pixel noise, and for "grid" a 3x3 grid of lines."""
    rng = np.random.default_rng(scene.seed)
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = scene.ground
    canvas += rng.normal(0, 5, size=(size, size, 1)).astype(np.float32)
    if scene.style == "grid":
        width = max(1, size // 32)
        for k in (1, 2):
            line = round(k * size / 3)
            canvas[line - width // 2 : line - width // 2 + width, :] += 35
            canvas[:, line - width // 2 : line - width // 2 + width] += 35
    return canvas


def render(scene: Scene, size: int) -> Image.Image:
    """The scene as an RGB image of size x size pixels."""
    canvas = _ground(scene, size)  # [S, S, 3]
    for thing in scene.things:
        mask = _mask(thing, size)
        colour = np.broadcast_to(np.array(thing.rgb, np.float32), canvas.shape)
        pattern = _pattern(thing.texture, size, (thing.centre[0] * size, thing.centre[1] * size))
        if pattern is not None:
            colour = np.where(pattern[..., None], colour * 0.35, colour)
        canvas[mask] = colour[mask]
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")


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
) -> dict:
    """Write PNGs, manifest.jsonl (tasks), pretrain.jsonl, synthetic.json; return the summary."""
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
    bar = tqdm(total=sum(n for *_, n in plan), unit="img", disable=not progress)
    records = {key[:2]: _write_split(out, *key, image_size, seed, bar) for key in plan}
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
    out: Path, name: str, split: str, count: int, size: int, seed: int, bar
) -> list[Record]:
    folder = out / "images" / name / split
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index, scene in enumerate(make_scenes(name, split, count, seed)):
        path = folder / f"{index:05d}.png"
        render(scene, size).save(path, compress_level=1)
        records.append(Record(path, scene.captions, name, split))
        bar.update()
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
