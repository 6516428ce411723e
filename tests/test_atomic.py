"""lpi.atomic: a write either completes or leaves the old file (and no temp file)."""

from __future__ import annotations

import json

import pytest

from lpi import atomic


def test_write_json_replaces_the_file_whole(tmp_path):
    path = tmp_path / "deep" / "state.json"
    atomic.write_json(path, {"a": 1})
    atomic.write_json(path, {"b": [1, 2]}, sort_keys=True)
    assert json.loads(path.read_text()) == {"b": [1, 2]}
    assert path.read_text().endswith("\n")
    assert not list(path.parent.glob(atomic.TEMP_GLOB))


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic.atomic_path(path) as temp:
        temp.write_bytes(b"half of the new")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old"
    assert not list(tmp_path.glob(atomic.TEMP_GLOB))


def test_temp_files_match_the_sweep_pattern(tmp_path):
    with atomic.atomic_path(tmp_path / "x.safetensors") as temp:
        assert temp.match(atomic.TEMP_GLOB) and temp.parent == tmp_path
        temp.write_bytes(b"new")
