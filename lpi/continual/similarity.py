"""The task similarity S of L_task (METHOD.md §4), given as a matrix shipped with the split.

A split that knows which tasks share attribute families ships the true S as
`task_similarity.json` beside its manifest:

    {"tasks": ["name", ...], "matrix": [[...], ...], "source": "free text"}

symmetric, diagonal 1, entries finite and in [-1, 1]. Reading refuses anything else with a
`SimilarityError` naming the file, so a bad matrix stops a run before its first step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lpi import atomic

FILE_NAME = "task_similarity.json"
SYMMETRY_TOLERANCE = 1e-6  # JSON floats round-trip exactly; this only forgives hand-written files


class SimilarityError(ValueError):
    """A task-similarity file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class TaskSimilarity:
    tasks: tuple[str, ...]
    matrix: tuple[tuple[float, ...], ...]
    source: str
    path: Path | None = None  # the file read, named in errors

    def restricted(self, names: Sequence[str]) -> list[list[float]]:
        """S over `names` (in that order): rows and columns picked from the full matrix;
        SimilarityError (naming the file) for a name it lacks."""
        index = {name: i for i, name in enumerate(self.tasks)}
        missing = [name for name in names if name not in index]
        if missing:
            raise SimilarityError(f"{self.path}: no similarity for task(s) {', '.join(missing)}")
        return [[self.matrix[index[a]][index[b]] for b in names] for a in names]


def _problem(tasks: object, matrix: object, source: object) -> str | None:
    """What is wrong with the three fields, or None."""
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        return '"tasks" must be a non-empty list of task names'
    if len(set(tasks)) != len(tasks):
        return '"tasks" names a task twice'
    if not isinstance(source, str):
        return '"source" must be a string'
    count = len(tasks)
    if not isinstance(matrix, list) or len(matrix) != count:
        return f'"matrix" must be a list of {count} rows (one per task)'
    for i, row in enumerate(matrix):
        if not isinstance(row, list) or len(row) != count:
            return f'"matrix" row {i} must have {count} entries'
        for j, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, int | float):
                return f'"matrix"[{i}][{j}] is not a number'
            if not math.isfinite(value) or not -1.0 <= value <= 1.0:
                return f'"matrix"[{i}][{j}] = {value} is not a finite number in [-1, 1]'
    for i in range(count):
        if abs(matrix[i][i] - 1.0) > SYMMETRY_TOLERANCE:
            return f'"matrix"[{i}][{i}] = {matrix[i][i]} (the diagonal must be 1)'
        for j in range(i):
            if abs(matrix[i][j] - matrix[j][i]) > SYMMETRY_TOLERANCE:
                return f'"matrix" is not symmetric at [{i}][{j}] and [{j}][{i}]'
    return None


def write_similarity(
    path: str | Path, tasks: Sequence[str], matrix: Sequence[Sequence[float]], source: str
) -> Path:
    """Validate and write `task_similarity.json` atomically; ValueError on a bad matrix."""
    tasks = [str(t) for t in tasks]
    rows = [[float(v) for v in row] for row in matrix]
    problem = _problem(tasks, rows, source)
    if problem:
        raise SimilarityError(f"{path}: {problem}")
    return atomic.write_json(path, {"tasks": tasks, "matrix": rows, "source": source})


def read_similarity(path: str | Path, required: Sequence[str] = ()) -> TaskSimilarity:
    """Read and validate; `required` tasks must all be in the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SimilarityError(f"{path}: unreadable task similarity ({error})") from error
    if not isinstance(data, dict):
        raise SimilarityError(f"{path}: must be a JSON object with tasks, matrix, source")
    problem = _problem(data.get("tasks"), data.get("matrix"), data.get("source", ""))
    if problem:
        raise SimilarityError(f"{path}: {problem}")
    similarity = TaskSimilarity(
        tuple(data["tasks"]),
        tuple(tuple(float(v) for v in row) for row in data["matrix"]),
        str(data.get("source", "")),
        path,
    )
    similarity.restricted(required)  # SimilarityError, naming the file, for a task it lacks
    return similarity


def default_path(manifest: str | Path) -> Path | None:
    """`task_similarity.json` beside the manifest, if there is one."""
    candidate = Path(manifest).parent / FILE_NAME
    return candidate if candidate.is_file() else None
