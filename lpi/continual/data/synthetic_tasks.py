"""The synthetic benchmark's vocabulary and tasks: attribute values, grounds, and how each task
composes its scenes (`TaskSpec`). `lpi.continual.data.synthetic` samples and writes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lpi.continual.data.drawing import RGB, Thing

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
MIN_CONTRAST = 90.0  # RGB distance below which an object colour is not drawn on a ground
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
    r, g, b = (int(c) for c in np.clip(np.array(rgb) + noise, 0, 255))
    return r, g, b


def _thing(
    attrs: dict,
    rng: np.random.Generator,
    centre: tuple[float, float],
    size: str,
    texture: str,
    suffix: str = "",
) -> Thing:
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
    x, y = rng.uniform(margin, 1 - margin, size=2)
    return float(x), float(y)


def near(position: str, rng: np.random.Generator) -> tuple[float, float]:
    """A named position's centre, moved by up to 0.03 of the side each way."""
    x, y = POSITIONS[position][0]
    return (x + rng.uniform(-0.03, 0.03), y + rng.uniform(-0.03, 0.03))


def contrasts(attrs: dict, ground: RGB) -> bool:
    """Every object colour of the scene stands out from this ground (by MIN_CONTRAST)."""
    colours = [attrs[key] for key in ("colour", "colour2") if key in attrs]
    return all(math.dist(COLOURS[c], ground) >= MIN_CONTRAST for c in colours)


def pretrain_extras(attrs: dict, rng: np.random.Generator) -> dict:
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
    centre = near(attrs["position"], rng) if "position" in attrs else _anywhere(size, rng)
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
    return (_thing(attrs, rng, near(attrs["position"], rng), attrs["size"], "plain"),)


def _centred_things(attrs: dict, rng: np.random.Generator) -> tuple[Thing, ...]:
    x, y = 0.5 + rng.uniform(-0.08, 0.08, size=2)
    centre = (float(x), float(y))
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
