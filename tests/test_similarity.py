"""The given task similarity of L_task: writing, reading and refusing bad files by name."""

from __future__ import annotations

import json
import math

import pytest

from lpi.continual.similarity import (
    FILE_NAME,
    SimilarityError,
    default_path,
    read_similarity,
    write_similarity,
)

TASKS = ["shapes", "textures", "scenes"]
MATRIX = [[1.0, 0.7, -0.2], [0.7, 1.0, 0.1], [-0.2, 0.1, 1.0]]


def test_write_then_read_round_trips_exactly(tmp_path):
    path = write_similarity(tmp_path / FILE_NAME, TASKS, MATRIX, "attribute families")
    similarity = read_similarity(path, required=["textures", "shapes"])
    assert similarity.tasks == tuple(TASKS) and similarity.source == "attribute families"
    assert [list(row) for row in similarity.matrix] == MATRIX
    # Restricted to the tasks a run trains, in its order.
    assert similarity.restricted(["textures", "shapes"]) == [[1.0, 0.7], [0.7, 1.0]]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no temp file left behind
    with pytest.raises(SimilarityError, match=r"no similarity for task\(s\) colours") as err:
        similarity.restricted(["shapes", "colours"])  # a saved run's task the file lacks
    assert str(path) in str(err.value)


def test_default_path_is_beside_the_manifest(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    assert default_path(manifest) is None
    write_similarity(tmp_path / FILE_NAME, TASKS, MATRIX, "")
    assert default_path(manifest) == tmp_path / FILE_NAME


def _broken(matrix=MATRIX, tasks=TASKS):
    return {"tasks": tasks, "matrix": matrix, "source": "test"}


BAD = {
    "not symmetric": _broken([[1.0, 0.7, -0.2], [0.6, 1.0, 0.1], [-0.2, 0.1, 1.0]]),
    "the diagonal must be 1": _broken([[0.9, 0.7, -0.2], [0.7, 1.0, 0.1], [-0.2, 0.1, 1.0]]),
    "in [-1, 1]": _broken([[1.0, 1.5, -0.2], [1.5, 1.0, 0.1], [-0.2, 0.1, 1.0]]),
    "list of 3 rows": _broken(MATRIX[:2]),
    "row 1 must have 3": _broken([MATRIX[0], MATRIX[1][:2], MATRIX[2]]),
    "not a number": _broken([[1.0, "x", -0.2], ["x", 1.0, 0.1], [-0.2, 0.1, 1.0]]),
    "names a task twice": _broken(tasks=["a", "a", "b"]),
}


@pytest.mark.parametrize("why", list(BAD))
def test_bad_files_are_refused_naming_the_file(tmp_path, why):
    path = tmp_path / FILE_NAME
    path.write_text(json.dumps(BAD[why]))
    with pytest.raises(SimilarityError, match=why.replace("[", r"\[").replace("]", r"\]")) as err:
        read_similarity(path)
    assert str(path) in str(err.value)


def test_non_finite_unreadable_and_missing_tasks_are_refused(tmp_path):
    path = tmp_path / FILE_NAME
    path.write_text(json.dumps(_broken([[1.0, math.nan, 0.0], [math.nan, 1.0, 0.0], [0, 0, 1]])))
    with pytest.raises(SimilarityError, match="finite"):  # Python's json reads NaN
        read_similarity(path)
    path.write_text("{not json")
    with pytest.raises(SimilarityError, match="unreadable") as err:
        read_similarity(path)
    assert str(path) in str(err.value)
    write_similarity(path, TASKS, MATRIX, "")
    with pytest.raises(SimilarityError, match=r"no similarity for task.*colours"):
        read_similarity(path, required=["shapes", "colours"])


def test_write_refuses_a_bad_matrix_and_keeps_the_old_file(tmp_path):
    path = write_similarity(tmp_path / FILE_NAME, TASKS, MATRIX, "good")
    with pytest.raises(SimilarityError, match="not symmetric"):
        write_similarity(path, TASKS, [[1.0, 0.5, 0], [0.4, 1.0, 0], [0, 0, 1.0]], "bad")
    with pytest.raises(SimilarityError, match="finite"):
        write_similarity(path, TASKS, [[1.0, math.inf, 0], [math.inf, 1, 0], [0, 0, 1]], "bad")
    assert read_similarity(path).source == "good"
