"""Synthetic inputs made once up front (random captions, small PNGs) and the requests drawn
from them by op weight, task and modality."""

from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from clients.load.config import OPS, LoadConfig

POOL = 64  # distinct synthetic captions and images
IMAGE_SIDE = 64  # pixels of the synthetic PNGs
SEED_ITEMS = 8  # items indexed per task before a run that searches

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
SHAPES = ("square", "circle", "triangle", "star", "stripe", "dot")
PLACES = ("on the left", "on the right", "in the corner", "in the middle", "near the top")


def make_caption(rng: random.Random) -> str:
    """A short random caption, e.g. 'a red circle next to two blue squares in the corner'."""
    first = f"a {rng.choice(list(COLOURS))} {rng.choice(SHAPES)}"
    if rng.random() < 0.5:
        return f"{first} {rng.choice(PLACES)}"
    second = f"{rng.choice(('two', 'three', 'some'))} {rng.choice(list(COLOURS))} "
    return f"{first} next to {second}{rng.choice(SHAPES)}s {rng.choice(PLACES)}"


def make_png(rng: random.Random, side: int = IMAGE_SIDE) -> str:
    """A small PNG of random shapes on a random background, base64-encoded."""
    colours = list(COLOURS.values())
    image = Image.new("RGB", (side, side), rng.choice(colours))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 4)):
        x0, y0 = rng.randrange(side - 8), rng.randrange(side - 8)
        box = (x0, y0, rng.randint(x0 + 4, side), rng.randint(y0 + 4, side))
        shape = rng.choice((draw.rectangle, draw.ellipse))
        shape(box, fill=rng.choice(colours))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@dataclass(frozen=True)
class Request:
    op: str
    task: str
    path: str
    body: dict
    texts: int
    images: int

    @property
    def items(self) -> int:
        return self.texts + self.images


class Workload:
    """Draws requests: an op by weight, a task, and items from pools made once up front."""

    def __init__(self, config: LoadConfig, tasks: list[str]) -> None:
        self.rng = random.Random(config.seed)
        self.config, self.tasks = config, tasks
        self.ops = [op for op in OPS if config.weights.get(op, 0) > 0]
        self.op_weights = [config.weights[op] for op in self.ops]
        self.captions = [make_caption(self.rng) for _ in range(POOL)]
        self.images = [make_png(self.rng) for _ in range(POOL)]

    def next(self) -> Request:
        op = self.rng.choices(self.ops, self.op_weights)[0]
        task = self.rng.choice(self.tasks)
        if op == "search":
            kind, value = self._item()
            return Request(
                op,
                task,
                "/search",
                {"task": task, "query": {kind: value}, "top_k": 10},
                int(kind == "text"),
                int(kind == "image"),
            )
        items = [self._item() for _ in range(self.config.items_per_request)]
        texts = [value for kind, value in items if kind == "text"]
        images = [value for kind, value in items if kind == "image"]
        if op == "embed":
            body: dict[str, Any] = {"task": task, "texts": texts, "images": images}
            return Request(op, task, "/embed", body, len(texts), len(images))
        body = {"task": task, "items": [{kind: value} for kind, value in items]}
        return Request(op, task, "/index", body, len(texts), len(images))

    def seed_index(self, task: str) -> Request:
        """Items to index before a run that searches, so searches find something."""
        half = SEED_ITEMS // 2
        items = [{"text": c} for c in self.captions[:half]]
        items += [{"image": i} for i in self.images[:half]]
        return Request("index", task, "/index", {"task": task, "items": items}, half, half)

    def _item(self) -> tuple[str, str]:
        kind = self.config.modality
        if kind == "mixed":
            kind = self.rng.choice(("text", "image"))
        pool = self.captions if kind == "text" else self.images
        return kind, self.rng.choice(pool)
