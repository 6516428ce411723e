"""A PNG heatmap of recall per task across the task sequence, drawn with PIL alone.

Row t is the evaluation after training task t, column i task i; cells above the diagonal
(tasks not yet seen) stay blank. No plotting library is needed at run time.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from lpi.atomic import atomic_path

CELL = 64
MARGIN_LEFT = 150
MARGIN_TOP = 120


def _colour(value: float, low: float, high: float) -> tuple[int, int, int]:
    """White (low) to dark blue (high)."""
    share = 0.0 if high <= low else (value - low) / (high - low)
    return (int(255 - 215 * share), int(255 - 175 * share), int(255 - 75 * share))


def draw_heatmap(matrix: list[list[float]], tasks: list[str], title: str, path: Path) -> Path:
    """Write the ragged matrix (row t holds tasks 0..t) as a PNG, atomically."""
    count = len(tasks)
    width, height = MARGIN_LEFT + CELL * count + 20, MARGIN_TOP + CELL * count + 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    values = [v for row in matrix for v in row if v is not None]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    draw.text((10, 10), title, fill="black", font=font)
    draw.text((10, 30), "rows: after training task t; columns: task evaluated", fill="gray")
    for i, name in enumerate(tasks):
        x = MARGIN_LEFT + i * CELL
        draw.text((x + 4, MARGIN_TOP - 20 - 12 * (i % 2)), name[:14], fill="black", font=font)
        draw.text((10, MARGIN_TOP + i * CELL + CELL // 2 - 6), f"after {name[:16]}", fill="black")
    for t, row in enumerate(matrix):
        for i, value in enumerate(row):
            box = (MARGIN_LEFT + i * CELL, MARGIN_TOP + t * CELL)
            end = (box[0] + CELL - 2, box[1] + CELL - 2)
            fill = _colour(value, low, high) if value is not None else (230, 230, 230)
            draw.rectangle((box, end), fill=fill, outline="gray")
            text = "-" if value is None else f"{value:.1f}"
            ink = "white" if value is not None and value > (low + high) / 2 else "black"
            draw.text((box[0] + 14, box[1] + CELL // 2 - 6), text, fill=ink, font=font)
    with atomic_path(path) as temp:
        image.save(temp, format="PNG")
    return path
