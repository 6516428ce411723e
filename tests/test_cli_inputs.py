"""What `lpi index` reads: JSONL files are checked whole before anything is sent, then streamed
line by line (never held in memory), images read when their chunk is."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from clients.cli_inputs import MappedItems, jsonl_items


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def test_a_jsonl_file_is_streamed_and_gives_every_item(tmp_path):
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "red.png")
    rows = [{"id": f"t{i}", "text": f"caption {i}", "payload": {"i": i}} for i in range(5)]
    rows.append({"id": "img", "image": "red.png"})
    source = tmp_path / "items.jsonl"
    _write(source, rows)
    items = jsonl_items(source)
    assert len(items) == 6
    assert not hasattr(items, "_sources")  # only the path and the count are kept
    got = list(items)
    assert [item.id for item in got] == [row["id"] for row in rows]
    assert got[0].payload == {"i": 0} and got[-1].image  # the image read, as base64
    assert [item.id for item in items] == [row["id"] for row in rows]  # iterable again


def test_every_line_is_checked_before_anything_is_sent(tmp_path):
    source = tmp_path / "items.jsonl"
    _write(source, [{"id": "a", "text": "ok"}, {"id": "b", "image": "missing.png"}])
    with pytest.raises(ValueError, match=r"items.jsonl:2: image: no file"):
        jsonl_items(source)
    source.write_text('{"id": "a", "text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"items.jsonl:2"):
        jsonl_items(source)
    source.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no items"):
        jsonl_items(source)


def test_mapped_items_keep_their_size_and_apply_as_sent(tmp_path):
    source = tmp_path / "items.jsonl"
    _write(source, [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}])
    mapped = MappedItems(jsonl_items(source), lambda item: item.model_copy(update={"id": "z"}))
    assert len(mapped) == 2 and [item.id for item in mapped] == ["z", "z"]


def test_rows_without_an_id_get_the_same_id_on_every_run(tmp_path):
    """`lpi index --resume` skips what a run stored: an id-less row must not get a fresh uuid."""
    source = tmp_path / "items.jsonl"
    _write(source, [{"text": "a"}, {"text": "b"}])
    first = [item.id for item in jsonl_items(source)]
    assert first == ["items.jsonl:1", "items.jsonl:2"]
    assert [item.id for item in jsonl_items(source)] == first


def test_an_image_outside_the_files_folder_is_refused(tmp_path):
    (tmp_path / "inner").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    source = tmp_path / "inner" / "items.jsonl"
    _write(source, [{"id": "x", "image": "../secret.png"}])
    with pytest.raises(ValueError, match="outside the file's folder"):
        jsonl_items(source)
