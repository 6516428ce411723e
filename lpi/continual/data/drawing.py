"""Drawing the synthetic benchmark's scenes: grounds, shapes, textures, as RGB images.

A scene is data (`Scene`, `Thing`); `render` turns one into pixels. Everything is a function of
the scene, so the same scene always draws the same image.

Dimensions: S the image side in pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]


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
    style: str  # "plain", "grid" or "fade"
    things: tuple[Thing, ...]
    attributes: dict[str, str]
    captions: tuple[str, ...]
    seed: int  # of the ground's pixel noise


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
        return np.asarray((y // half) % 2 == 1)
    if texture == "checked":
        return np.asarray(((x // half) + (y // half)) % 2 == 1)
    if texture == "wavy":
        return np.asarray(((y + half * np.sin(0.5 * np.pi * x / half)) // half) % 2 == 1)
    if texture == "spotted":
        period = 2 * half
        dx, dy = x % period - half, y % period - half
        return np.asarray(dx * dx + dy * dy <= (0.6 * half) ** 2)
    raise ValueError(f"unknown texture {texture!r}")


def _ground(scene: Scene, size: int) -> np.ndarray:
    """Float [S, S, 3]: the ground colour, pixel noise, for "grid" a 3x3 grid of lines, for
    "fade" a darkening towards the bottom."""
    rng = np.random.default_rng(scene.seed)
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = scene.ground
    canvas += rng.normal(0, 5, size=(size, size, 1)).astype(np.float32)
    if scene.style == "fade":  # darker towards the bottom
        canvas *= np.linspace(1.0, 0.7, size, dtype=np.float32)[:, None, None]
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
