"""load.png: the latency of every request against its start time, swaps as vertical lines
(PIL only, written atomically)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [
    (31, 119, 180),
    (44, 160, 44),
    (148, 103, 189),
    (140, 86, 75),
    (23, 190, 207),
    (127, 127, 127),
    (188, 189, 34),
    (227, 119, 194),
]
SWAP_COLOUR, ERROR_COLOUR = (255, 127, 14), (214, 39, 40)


def draw_latency(report: dict, path: Path, size: tuple[int, int] = (1000, 520)) -> None:
    """Latency of every request against its start time; swaps as vertical lines (PNG)."""
    width, height = size
    left, right, top, bottom = 70, 20, 36, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    samples, swaps = report["samples"], report["swaps"]
    t_max = max([s[4] + s[5] / 1000 for s in samples] + [w["end"] for w in swaps] + [1e-3])
    ok = [s[5] for s in samples if s[6] is None]
    y_max = max(float(np.percentile(ok, 99.5)) * 1.2 if ok else 1.0, 1e-3)

    def x(t: float) -> float:
        return left + (width - left - right) * t / t_max

    def y(ms: float) -> float:
        return height - bottom - (height - top - bottom) * min(ms, y_max) / y_max

    _axes(draw, (left, top, width - right, height - bottom), t_max, y_max, x, y)
    colour = {
        c: PALETTE[i % len(PALETTE)]
        for i, c in enumerate(dict.fromkeys(level["concurrency"] for level in report["levels"]))
    }
    for swap in swaps:
        line = ERROR_COLOUR if swap["error"] else SWAP_COLOUR
        draw.line([(x(swap["start"]), top), (x(swap["start"]), height - bottom)], line, 1)
    for concurrency, _, _, _, start, ms, error in samples:
        px, py = x(start), y(ms)
        if error:
            draw.line([(px - 3, py - 3), (px + 3, py + 3)], ERROR_COLOUR, 2)
            draw.line([(px - 3, py + 3), (px + 3, py - 3)], ERROR_COLOUR, 2)
        else:
            draw.rectangle([px - 1, py - 1, px + 1, py + 1], colour.get(concurrency, PALETTE[0]))
    title = "latency per request by concurrency; orange lines: task swaps; red x: failures; "
    draw.text((left, 6), title + "y clipped at 1.2 x p99.5", fill="black")
    for i, c in enumerate(colour):
        draw.rectangle([left + 60 * i, 22, left + 6 + 60 * i, 28], colour[c])
        draw.text((left + 10 + 60 * i, 18), f"c={c}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as f:
        image.save(f, "PNG")
    os.replace(f.name, path)


def _axes(draw: ImageDraw.ImageDraw, box, t_max: float, y_max: float, x, y) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline="black")
    for i in range(6):
        t, ms = t_max * i / 5, y_max * i / 5
        draw.line([(x(t), y1), (x(t), y1 + 4)], "black")
        draw.text((x(t) - 10, y1 + 8), f"{t:.1f}", fill="black")
        draw.line([(x0 - 4, y(ms)), (x0, y(ms))], "black")
        draw.line([(x0 + 1, y(ms)), (x1 - 1, y(ms))], (230, 230, 230))
        draw.text((4, y(ms) - 6), f"{ms:.1f}", fill="black")
    draw.text(((x0 + x1) / 2 - 60, y1 + 26), "seconds since start", fill="black")
    draw.text((4, y0 - 16), "ms", fill="black")
