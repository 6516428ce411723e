"""The dataset readers: COCO captions, Karpathy splits and Fashion-MNIST into manifests, each
checked on files the tests write in the readers' exact formats."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from lpi.continual.data import coco, fashion_mnist, manifest


def _coco_files(folder: Path, split: str = "train2017") -> tuple[Path, Path]:
    """Four images: 1 person (large) + food (small); 2 appliance; 3 only a crowd; 4 no instances."""
    categories = [
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 52, "name": "banana", "supercategory": "food"},
        {"id": 78, "name": "microwave", "supercategory": "appliance"},
    ]
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (1, 2, 3, 4)]
    instances = [
        {"id": 10, "image_id": 1, "category_id": 52, "area": 50.0, "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 1, "area": 900.0, "iscrowd": 0},
        {"id": 12, "image_id": 2, "category_id": 78, "area": 10.0, "iscrowd": 0},
        {"id": 13, "image_id": 2, "category_id": 1, "area": 5000.0, "iscrowd": 1},
        {"id": 14, "image_id": 3, "category_id": 52, "area": 70.0, "iscrowd": 1},
    ]
    captions = [
        {"id": 21, "image_id": 1, "caption": "A Man, eating a banana."},
        {"id": 20, "image_id": 1, "caption": "Someone holds   fruit!"},
        {"id": 22, "image_id": 2, "caption": "A microwave (open)."},
        {"id": 23, "image_id": 3, "caption": "Bananas."},
        {"id": 24, "image_id": 4, "caption": "An empty room."},
    ]
    folder.mkdir(parents=True, exist_ok=True)
    caption_path = folder / f"captions_{split}.json"
    instance_path = folder / f"instances_{split}.json"
    caption_path.write_text(json.dumps({"images": images, "annotations": captions}))
    instance_path.write_text(json.dumps({"categories": categories, "annotations": instances}))
    return caption_path, instance_path


def test_coco_tasks_follow_the_largest_annotation_and_the_protocol_order(tmp_path):
    captions, instances = _coco_files(tmp_path)
    records = coco.coco_records(captions, instances, tmp_path / "img", "train")
    assert [(r.image.name, r.task) for r in records] == [
        ("000000000002.jpg", "appliance"),  # the 5000-px crowd of people does not count
        ("000000000003.jpg", "food"),  # only a crowd: it counts
        ("000000000001.jpg", "person"),  # 900 px person beats the 50 px banana
    ]  # image 4 has no instances; tasks arrive appliance ... food ... person
    assert records[2].captions == ("someone holds fruit", "a man, eating a banana")
    assert records[0].image == tmp_path / "img" / "000000000002.jpg"
    assert coco.COCO_TASKS[0] == "appliance" and coco.COCO_TASKS[-1] == "person"
    assert len(coco.coco_records(captions, instances, tmp_path, "train", max_per_task=0)) == 0


def test_clean_caption_cuts_to_30_words():
    assert coco.clean_caption("A  cat. On; a MAT!\n") == "a cat on a mat"
    assert len(coco.clean_caption(" ".join(["word"] * 40)).split()) == 30


def test_coco_cli_writes_a_valid_manifest(tmp_path):
    for split in ("train2017", "val2017"):
        _coco_files(tmp_path / "annotations", split)
    out = tmp_path / "out" / "coco.jsonl"
    coco.main(["coco", "--root", str(tmp_path), "--out", str(out), "--max-test-per-task", "1"])
    records = manifest.read_manifest(out, tasks=["appliance", "food", "person"], check_images=False)
    assert [r.split for r in records].count("test") == 3
    assert records[0].image == tmp_path / "train2017" / "000000000002.jpg"


def _karpathy(path: Path, with_filepath: bool) -> Path:
    entries = []
    for i, split in enumerate(["train", "restval", "val", "test", "test", "train"]):
        entry = {"filename": f"{i}.jpg", "split": split, "cocoid": 100 + i}
        entry["sentences"] = [{"raw": f"A photo number {i}.", "tokens": []}, {"raw": "  "}]
        if with_filepath:
            entry["filepath"] = "val2014"
        entries.append(entry)
    path.write_text(json.dumps({"images": entries, "dataset": "x"}))
    return path


def test_karpathy_records(tmp_path):
    data = _karpathy(tmp_path / "dataset_coco.json", with_filepath=True)
    records = coco.karpathy_records(data, tmp_path, "coco")
    assert [r.split for r in records] == ["train", "train", "val", "test", "test", "train"]
    assert records[0].image == tmp_path / "val2014" / "0.jpg"
    assert records[0].captions == ("a photo number 0",)  # the blank sentence is dropped
    by_id = coco.CocoTasks({100: "person", 103: "appliance", 104: "person"})
    assert [(r.image.name, r.task) for r in coco.karpathy_records(data, tmp_path, by_id)] == [
        ("3.jpg", "appliance"),
        ("0.jpg", "person"),
        ("4.jpg", "person"),
    ]


def test_karpathy_hash_tasks_are_stable(tmp_path):
    data = _karpathy(tmp_path / "dataset_flickr30k.json", with_filepath=False)
    hashed = coco.HashTasks(3, "flickr")
    records = coco.karpathy_records(data, tmp_path, hashed)
    assert records == coco.karpathy_records(data, tmp_path, hashed)
    assert all(r.image.parent == tmp_path for r in records)  # Flickr has no filepath
    order = [hashed.names.index(r.task) for r in records]
    assert order == sorted(order)  # records arrive task by task
    assert {r.task for r in records} <= set(hashed.names) == {"flickr-0", "flickr-1", "flickr-2"}
    assert hashed({"filename": "0.jpg"}) == hashed({"filename": "0.jpg", "split": "x"})


def test_readers_name_the_bad_file(tmp_path):
    bad = tmp_path / "dataset.json"
    bad.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "dev", "sentences": []}]}))
    with pytest.raises(ValueError, match=r"dataset\.json: images\[0\]: unknown split 'dev'"):
        coco.karpathy_records(bad, tmp_path, "t")
    bad.write_text("{")
    with pytest.raises(ValueError, match=r"dataset\.json: malformed JSON"):
        coco.karpathy_records(bad, tmp_path, "t")


# --- synthetic images --------------------------------------------------------------------------


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion(root: Path, per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        labels = np.repeat(np.arange(10), per_class)
        _idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (len(labels), 28, 28)))
        _idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def test_fashion_mnist_reads_idx_and_writes_a_manifest(tmp_path):
    root = _fake_fashion(tmp_path / "idx")
    images, labels = fashion_mnist.load_split(root, "test")
    assert images.shape == (80, 28, 28) and labels.tolist()[:9] == [0] * 8 + [1]
    unique = fashion_mnist.generate(tmp_path / "out", root, train_per_task=6, test_per_task=5)
    assert unique == {"tops": 1.0, "footwear": 1.0, "other": 1.0}
    records = manifest.read_manifest(tmp_path / "out" / "manifest.jsonl", tasks=["tops", "other"])
    assert manifest.tasks(records) == ["tops", "footwear", "other"]
    record = manifest.select(records, "footwear", "test")[0]
    assert any(name in record.captions[0] for name in ("sandal", "sneaker", "ankle boot"))
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x0d\x01\0\0\0\x01"))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz: not an unsigned-byte"):
        fashion_mnist.load_split(root, "test")


@pytest.mark.skipif(not fashion_mnist.DEFAULT_ROOT.is_dir(), reason="dataset-fashion-mnist absent")
def test_fashion_mnist_installed_files():
    images, labels = fashion_mnist.load_split(fashion_mnist.DEFAULT_ROOT, "test")
    assert images.shape == (10000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10
