"""The "bench" suite of the synthetic benchmark: six tasks with related and unrelated pairs on
purpose, a pretraining set whose captions use every word the tasks use, and the tasks' true
similarity.

Every task names its objects' shape and colour; what sets a task apart is the other attribute
families its captions vary (`families`). Two of them share "background" (sizes-backgrounds and
backgrounds-positions), two share "position" (positions and backgrounds-positions), three share
"size" (textures, positions, sizes-backgrounds), and shapes-colours and counts share nothing
with any other. Counts draws its groups in a row or a column on a sea-green felt with grid
lines, far from positions' slate grid, so task keys on frozen features tell the two apart. The
true task similarity is the Jaccard index of those family sets (`similarity_matrix`).

The pretraining set ("pretrain-bench") draws single objects (sometimes two, or a few of one
kind, in a row, a column or a grid) on varied grounds: a named background (either palette)
with probability 0.4, otherwise an unnamed grey, dark, light or random colour, so features
learnt on it keep the ground. Its captions name shape and colour and, each with some
probability, size, texture, position, background, count and arrangement, in phrasings that
together use every word of every task's templates (tests check it), so no token the tasks use
keeps its random initial embedding. The tasks' exact templates and combinations stay unseen, so
prompts still have something to learn.
"""

from __future__ import annotations

from itertools import combinations as pairs

import numpy as np

from lpi.continual.data.drawing import RGB, Thing
from lpi.continual.data.synthetic_tasks import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPE_COLOUR,
    SHAPES,
    SIZES,
    TASKS,
    TEXTURES,
    TaskSpec,
    _dark,
    _grey,
    _jitter,
    _light,
    _named,
    _pair_things,
    _pretrain_things,
    _thing,
    contrasts,
    near,
)

BACKGROUNDS_2: dict[str, RGB] = {  # the named grounds of "backgrounds-positions", drawn as a fade
    "navy": (25, 35, 100),
    "forest": (30, 85, 45),
    "plum": (95, 40, 95),
    "rust": (165, 75, 30),
    "sky": (120, 180, 235),
    "ochre": (205, 160, 40),
}
COUNTS = {"two": 2, "three": 3, "four": 4, "five": 5}
_CELLS = [((c + 0.5) / 3, (r + 0.5) / 2) for r in range(2) for c in range(3)]  # 3x2 grid
FELT: RGB = (80, 200, 160)  # the ground of "counts" (a sea-green felt), drawn with grid lines
ARRANGEMENTS = ("row", "column")
LINE_RADIUS = 0.09  # five objects of this radius fit along one side


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("ss") or shape.endswith("x") else "s")


# --- new tasks -----------------------------------------------------------------------------


def _fade(attrs: dict, rng: np.random.Generator) -> tuple[RGB, str]:
    return _jitter(BACKGROUNDS_2[attrs["background"]], rng, 10), "fade"


def _felt(attrs: dict, rng: np.random.Generator) -> tuple[RGB, str]:
    return _jitter(FELT, rng, 8), "grid"


def _placed_things(attrs: dict, rng: np.random.Generator) -> tuple[Thing, ...]:
    return (_thing(attrs, rng, near(attrs["position"], rng), "small", "plain"),)


def _counted_things(attrs: dict, rng: np.random.Generator) -> tuple[Thing, ...]:
    """`count` equal objects: evenly spaced along a row or a column when the scene names an
    arrangement (the counts task always does; each centre jitters by up to 0.02, so five small
    neighbours may touch), else each in its own cell of a 3x2 grid (pretraining's unnamed
    groups, never overlapping)."""
    count = COUNTS[attrs["count"]]
    arrangement = attrs.get("arrangement")
    if arrangement is not None:
        across = rng.uniform(0.3, 0.7)  # where the line sits across its direction
        along = [(i + 0.5) / count for i in range(count)]
        spots = [(a, across) if arrangement == "row" else (across, a) for a in along]
        size, radius = "small", LINE_RADIUS
    else:
        spots = [_CELLS[cell] for cell in rng.permutation(len(_CELLS))[:count]]
        size = attrs.get("size", "small")
        radius = min(SIZES[size], 0.14)  # a medium object still fits a third of the side
    things = []
    for x, y in spots:
        centre = (x + rng.uniform(-0.02, 0.02), y + rng.uniform(-0.02, 0.02))
        thing = _thing(attrs, rng, centre, size, attrs.get("texture", "plain"))
        things.append(
            Thing(thing.shape, thing.rgb, thing.texture, centre, radius * 0.95, thing.angle)
        )
    return tuple(things)


BACKGROUNDS_POSITIONS = TaskSpec(
    name="backgrounds-positions",
    families=(*SHAPE_COLOUR, ("background", tuple(BACKGROUNDS_2)), ("position", tuple(POSITIONS))),
    templates=(
        "a {colour} {shape} {where} on a {background} background",
        "a {background} background with a {colour} {shape} {where}",
        "{where} of a {background} background there is a {colour} {shape}",
        "a picture of a {colour} {shape} {where} against {background}",
    ),
    ground=_fade,
    compose=_placed_things,
    nominal_ground=lambda attrs: BACKGROUNDS_2[attrs["background"]],
)
COUNTS_TASK = TaskSpec(
    name="counts",
    families=(*SHAPE_COLOUR, ("count", tuple(COUNTS)), ("arrangement", ARRANGEMENTS)),
    templates=(
        "{count} {colour} {plural} in a {arrangement}",
        "a {arrangement} of {count} {colour} {plural}",
        "a picture of {count} {colour} {plural} in a {arrangement}",
        "there are {count} {plural} coloured {colour} in a {arrangement}",
    ),
    ground=_felt,
    compose=_counted_things,
    nominal_ground=lambda attrs: FELT,
)
BENCH_TASKS = (*TASKS, BACKGROUNDS_POSITIONS, COUNTS_TASK)
BENCH_TASK_NAMES = tuple(task.name for task in BENCH_TASKS)
OBJECT_FAMILIES = frozenset({"shape", "colour"})  # every task names these


def families(task: TaskSpec) -> frozenset[str]:
    """The attribute families that set a task apart: its captions' families beyond the object's
    shape and colour; a second object counts as one family, "binding"."""
    named = {key for key, _ in task.families}
    extra = named - OBJECT_FAMILIES - {"shape2", "colour2"}
    return frozenset(extra | ({"binding"} if "shape2" in named else set()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def similarity_matrix(task_families: dict[str, frozenset[str]]) -> list[list[float]]:
    """Jaccard of the tasks' family sets, in the dict's order: symmetric, 1 on the diagonal."""
    sets = list(task_families.values())
    return [[round(jaccard(a, b), 4) for b in sets] for a in sets]


def related_pairs(task_families: dict[str, frozenset[str]]) -> list[tuple[str, str]]:
    """Pairs of tasks sharing at least one family (for logs and docs)."""
    return [(a, b) for a, b in pairs(task_families, 2) if task_families[a] & task_families[b]]


# --- pretraining ---------------------------------------------------------------------------

BENCH_NAMING = {"size": 0.35, "texture": 0.35, "position": 0.35, "background": 0.4}
TWO_OBJECTS, MANY_OBJECTS = 0.1, 0.12  # chance of a pair, of a counted group
NAMED_ARRANGEMENT = 0.5  # chance that a counted group stands in a named row or column
_SIZE_AFTER = ", {size} in size"
_TEXTURE_AFTER = (" with a {texture} pattern", " that is {texture}")
_GROUND_PHRASES = (
    " on a {background} background",
    " against a {background} background",
    " against {background}",
    " on {background}",
)
_OPENINGS = ("a ", "a picture of a ", "a photo of a ", "there is a ", "{where_first} there is a ")


def bench_pretrain_extras(attrs: dict, rng: np.random.Generator) -> dict:
    """Which optional attributes a pretraining image names (and draws)."""
    extras: dict = {}
    kind = rng.random()
    if kind < TWO_OBJECTS:
        extras["shape2"] = str(rng.choice(SHAPES))
        extras["colour2"] = str(rng.choice([c for c in COLOURS if c != attrs["colour"]]))
    elif kind < TWO_OBJECTS + MANY_OBJECTS:
        extras["count"] = str(rng.choice(list(COUNTS)))
        if rng.random() < NAMED_ARRANGEMENT:
            extras["arrangement"] = str(rng.choice(ARRANGEMENTS))
    named = {key: bool(rng.random() < p) for key, p in BENCH_NAMING.items()}
    if named["position"] and not set(extras) & {"count", "shape2"}:
        extras["position"] = str(rng.choice(list(POSITIONS)))
    if named["size"] and not set(extras) & {"shape2", "arrangement"}:
        big = "position" in extras or "count" in extras
        extras["size"] = str(rng.choice(("small", "medium") if big else list(SIZES)))
    if named["texture"] and "shape2" not in extras:
        extras["texture"] = str(rng.choice(TEXTURES))
    scene = attrs | extras
    if named["background"]:
        palette = [name for name, rgb in _PALETTE.items() if contrasts(scene, rgb)]
        scene["background"] = str(rng.choice(palette))
    return scene


_PALETTE = {**BACKGROUNDS, **BACKGROUNDS_2}


def _varied_ground(attrs: dict, rng: np.random.Generator) -> tuple[RGB, str]:
    """A named background as its task draws it, else an unnamed grey, dark, light or colour."""
    if "background" in attrs:
        return (_fade if attrs["background"] in BACKGROUNDS_2 else _named)(attrs, rng)
    for _ in range(100):  # a ground the objects stand out from (one try in a few fails)
        ground, style = _unnamed_ground(rng)
        if contrasts(attrs, ground):
            return ground, style
    return (125, 125, 125), "plain"  # every object colour contrasts with mid grey


def _unnamed_ground(rng: np.random.Generator) -> tuple[RGB, str]:
    """The classic tasks' grey, dark or light ground (3 in 5), else a random colour."""
    kind = int(rng.integers(5))
    if kind < 3:
        return (_grey, _dark, _light)[kind]({}, rng)
    r, g, b = (int(c) for c in rng.integers(0, 256, size=3))
    return (r, g, b), str(rng.choice(("plain", "grid", "fade")))


def _bench_things(attrs: dict, rng: np.random.Generator) -> tuple[Thing, ...]:
    if "shape2" in attrs:
        return _pair_things(attrs, rng)
    if "count" in attrs:
        return _counted_things(attrs, rng)
    return _pretrain_things(attrs, rng)  # one object, drawn as the classic pretraining set's


def bench_caption(attrs: dict, rng: np.random.Generator) -> str:
    """One caption naming exactly the scene's attributes, in a randomly drawn phrasing."""
    if "shape2" in attrs:
        first = f"{attrs['colour']} {attrs['shape']}"
        second = f"{attrs['colour2']} {attrs['shape2']}"
        body = str(
            rng.choice(
                (
                    f"a {first} and a {second}",
                    f"a {first} next to a {second}",
                    f"a {first} on the left and a {second} on the right",
                    f"a {second} to the right of a {first}",
                )
            )
        )
        return body + _ground_phrase(attrs, rng)
    size_after = "size" in attrs and rng.random() < 0.3
    texture_after = "texture" in attrs and rng.random() < 0.4
    adjectives = "".join(
        f"{attrs[key]} "
        for key, after in (("size", size_after), ("texture", texture_after))
        if key in attrs and not after
    )
    if "count" in attrs:
        opening = str(rng.choice(("", "a group of ", "a picture of ", "there are ")))
        noun = f"{attrs['count']} {adjectives}{attrs['colour']} {plural(attrs['shape'])}"
        if "arrangement" in attrs:  # "a row of three ..." or "three ... in a row"
            if rng.random() < 0.5:
                opening = f"a {attrs['arrangement']} of "
            else:
                noun += f" in a {attrs['arrangement']}"
    else:
        opening = str(rng.choice(_OPENINGS[:4] if "position" not in attrs else _OPENINGS))
        if rng.random() < 0.25:
            noun = f"{adjectives}{attrs['shape']} coloured {attrs['colour']}"
        elif rng.random() < 0.2:
            noun = f"{adjectives}{attrs['shape']} in {attrs['colour']}"
        else:
            noun = f"{adjectives}{attrs['colour']} {attrs['shape']}"
    where = POSITIONS[attrs["position"]][1] if "position" in attrs else ""
    if "{where_first}" in opening:
        opening, where = opening.format(where_first=where), ""
    text = opening + noun
    if texture_after:
        text += str(rng.choice(_TEXTURE_AFTER)).format(texture=attrs["texture"])
    if where:
        text += " " + where
    text += _ground_phrase(attrs, rng)
    if size_after:
        text += _SIZE_AFTER.format(size=attrs["size"])
    return text


def _ground_phrase(attrs: dict, rng: np.random.Generator) -> str:
    if "background" not in attrs:
        return ""
    return str(rng.choice(_GROUND_PHRASES)).format(background=attrs["background"])


BENCH_PRETRAIN = TaskSpec(
    name="pretrain-bench",
    families=SHAPE_COLOUR,
    templates=(),  # captions come from `bench_caption`
    ground=_varied_ground,
    compose=_bench_things,
    nominal_ground=lambda attrs: (125, 125, 125),
)
