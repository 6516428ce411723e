"""Manifests (every bad input named by file and line), the synthetic generator (deterministic,
captions true to the pixels, tasks distinguishable), loaders (same batches with or without
workers). The dataset readers are in test_data_readers.py."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lpi
from lpi.continual.data import loader, manifest, synthetic, synthetic_tasks
from lpi.continual.data.manifest import ManifestError, Record

# --- manifest ----------------------------------------------------------------------------------


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 10, 10)).save(path)
    return path


def _line(image: str = "a.png", **overrides) -> str:
    record = {"image": image, "captions": ["a red square"], "task": "t0", "split": "train"}
    return json.dumps({**record, **overrides})


def _manifest(tmp_path: Path, *lines: str) -> Path:
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_manifest_round_trip(tmp_path):
    outside = _png(tmp_path / "elsewhere" / "c.png")
    folder = tmp_path / "data"
    records = [
        Record(_png(folder / "img" / "a.png"), ("a dog", "a brown dog"), "animals", "train"),
        Record(_png(folder / "img" / "b.png"), ("a car",), "vehicles", "test"),
        Record(outside, ("a cat ünïcode",), "animals", "val"),
    ]
    path = folder / "m.jsonl"
    manifest.write_manifest(path, records)
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert lines[0]["image"] == "img/a.png"  # under the folder: stored relative
    assert lines[2]["image"] == str(outside)  # outside it: stored absolute
    assert manifest.read_manifest(path, tasks=["animals"]) == records
    assert sorted(p.name for p in folder.iterdir()) == ["img", "m.jsonl"]  # no temp file left


def test_manifest_of_paths_relative_to_the_working_directory(tmp_path, monkeypatch):
    """`--out data/x` gives records relative to the working directory, not to the manifest."""
    monkeypatch.chdir(tmp_path)
    image = _png(Path("data") / "x" / "images" / "a.png")  # relative, as the CLIs pass it
    manifest.write_manifest(Path("data") / "x" / "m.jsonl", [Record(image, ("a",), "t", "train")])
    monkeypatch.chdir(tmp_path / "data")  # read from elsewhere: the manifest's folder decides
    [record] = manifest.read_manifest(Path("x") / "m.jsonl")
    assert Path(record.image).resolve() == (tmp_path / "data" / "x" / "images" / "a.png")


BAD_LINES = [
    ("{not json", "malformed JSON"),
    ('["a.png"]', "expected a JSON object, got list"),
    (json.dumps({"image": "b.png", "captions": ["x"], "split": "train"}), "missing field(s) task"),
    (_line("b.png", caption="x"), "unknown field(s) caption"),
    (_line("b.png", captions="a red square"), "'captions' must be a list, got str"),
    (_line("b.png", task=3), "'task' must be a str, got int"),
    (_line("b.png", captions=[]), "'captions' is empty"),
    (_line("b.png", captions=["ok", "  "]), "captions[1] is empty or whitespace"),
    (_line("b.png", captions=["ok", 5]), "captions[1] is int, not str"),
    (_line("b.png", task=" "), "'task' is empty"),
    (_line("b.png", split="training"), "unknown split 'training'"),
    (_line(" "), "'image' is empty"),
    (_line("missing.png"), "image file not found"),
    (_line("a.png"), "is already in split 'train' at line 1"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_manifest_errors_name_file_and_line(tmp_path, line, reason):
    path = _manifest(tmp_path, _line("a.png"), line)
    with pytest.raises(ManifestError) as error:
        manifest.read_manifest(path)
    assert str(error.value).startswith(f"{path}:2: ")
    assert reason in str(error.value)


def test_manifest_errors_without_a_line(tmp_path):
    path = _manifest(tmp_path, _line("a.png"), "", _line("b.png", task="t1", split="test"))
    with pytest.raises(ManifestError, match=r"m\.jsonl: task\(s\) t1, t2 have no 'train'"):
        manifest.read_manifest(path, tasks=["t0", "t1", "t2"])
    assert len(manifest.read_manifest(path, tasks=["t0"])) == 2  # the blank line is skipped
    with pytest.raises(ManifestError, match="holds no records"):
        manifest.read_manifest(_manifest(tmp_path, ""))
    with pytest.raises(ManifestError, match="cannot read"):
        manifest.read_manifest(tmp_path / "absent.jsonl")
    (tmp_path / "bad.jsonl").write_bytes(_line().encode() + b"\n\xff\xfe\n")
    with pytest.raises(ManifestError, match=r"bad\.jsonl:2: not UTF-8"):
        manifest.read_manifest(tmp_path / "bad.jsonl")


def test_manifest_warns_on_an_image_in_two_splits(tmp_path, caplog):
    path = _manifest(tmp_path, _line("a.png"), _line("a.png", split="test"))
    with caplog.at_level(logging.WARNING):
        assert len(manifest.read_manifest(path)) == 2
    assert "1 image(s) appear in more than one split" in caplog.text
    assert len(manifest.read_manifest(_manifest(tmp_path, _line("zz.png")), check_images=False))


def test_manifest_writer_refuses_bad_records(tmp_path):
    with pytest.raises(ManifestError, match=r"record 1: captions\[0\] is empty"):
        manifest.write_manifest(
            tmp_path / "m.jsonl",
            [
                Record(Path("a.png"), ("x",), "t", "train"),
                Record(Path("b.png"), ("",), "t", "train"),
            ],
        )
    assert not list(tmp_path.iterdir())


def test_manifest_helpers_keep_order():
    records = [
        Record(Path(f"/{i}.png"), ("c",), task, split)
        for i, (task, split) in enumerate(
            [("b", "train"), ("a", "train"), ("b", "test"), ("a", "test"), ("b", "train")]
        )
    ]
    assert manifest.tasks(records) == ["b", "a"]
    assert [r.image.name for r in manifest.select(records, "b", "train")] == ["0.png", "4.png"]
    assert len(manifest.select(records, ["a", "b"], "test")) == 2
    assert list(manifest.group(records)) == [
        ("b", "train"),
        ("a", "train"),
        ("b", "test"),
        ("a", "test"),
    ]


# --- COCO and Karpathy readers -----------------------------------------------------------------


SMALL = {"train_per_task": 40, "test_per_task": 20, "pretrain": 24, "image_size": 32}


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(out, seed=3, **SMALL)
    return out


def test_synthetic_is_deterministic_by_seed(synthetic_dir, tmp_path):
    synthetic.generate(tmp_path / "again", seed=3, **SMALL)
    synthetic.generate(tmp_path / "other", seed=4, **SMALL)
    for name in ("manifest.jsonl", "pretrain.jsonl"):
        text = (synthetic_dir / name).read_text()
        assert (tmp_path / "again" / name).read_text() == text
        assert (tmp_path / "other" / name).read_text() != text
    images = sorted((synthetic_dir / "images").rglob("*.png"))
    assert len(images) == 4 * 60 + 24 + 20
    for path in images[::7]:
        relative = path.relative_to(synthetic_dir)
        assert (tmp_path / "again" / relative).read_bytes() == path.read_bytes()


def test_synthetic_writes_valid_manifests(synthetic_dir):
    records = manifest.read_manifest(synthetic_dir / "manifest.jsonl", tasks=synthetic.TASK_NAMES)
    assert manifest.tasks(records) == list(synthetic.TASK_NAMES)
    assert {len(group) for group in manifest.group(records).values()} == {40, 20}
    pretrain = manifest.read_manifest(synthetic_dir / "pretrain.jsonl", tasks=["pretrain"])
    assert manifest.tasks(pretrain) == ["pretrain"]
    summary = json.loads((synthetic_dir / "synthetic.json").read_text())
    assert all(fraction == 1.0 for fraction in summary["unique_test_captions"].values())
    words = {w for r in pretrain for c in r.captions for w in c.split()}
    assert {"small", "striped", "left"} <= words  # some also name size, texture, position
    assert not words & {*synthetic_tasks.BACKGROUNDS, "background", "next", "and"}  # never grounds
    assert not words & {"pattern", "coloured"}  # nor pairs, nor the tasks' templates


def test_synthetic_pretrain_captions_name_what_is_drawn(synthetic_dir):
    """Every pretrain caption names shape, colour and exactly the extras its scene draws."""
    records = manifest.read_manifest(synthetic_dir / "pretrain.jsonl")
    scenes = synthetic.make_scenes("pretrain", "train", SMALL["pretrain"], seed=3)
    kept = manifest.select(records, "pretrain", "train")
    assert [r.captions for r in kept] == [s.captions for s in scenes]
    named = Counter(key for scene in scenes for key in scene.attributes)
    assert named["shape"] == named["colour"] == len(scenes)
    assert all(0 < named[key] < len(scenes) for key in ("size", "texture", "position"))
    for scene, record in zip(scenes, kept, strict=True):
        _check_scene(scene, np.asarray(Image.open(record.image)))
        (thing,) = scene.things
        assert thing.texture == scene.attributes.get("texture", "plain")
        if "size" in scene.attributes:
            assert abs(thing.radius / synthetic_tasks.SIZES[scene.attributes["size"]] - 1) <= 0.1
        else:  # unnamed sizes stay big enough to learn shape from
            assert thing.radius >= 0.9 * synthetic_tasks.SIZES["medium"]


def test_synthetic_captions_name_the_drawn_attributes(synthetic_dir):
    records = manifest.read_manifest(synthetic_dir / "manifest.jsonl")
    for name in synthetic.TASK_NAMES:
        scenes = synthetic.make_scenes(name, "test", 20, seed=3)
        kept = manifest.select(records, name, "test")
        assert [r.captions for r in kept] == [s.captions for s in scenes]
        for scene, record in zip(scenes, kept, strict=True):
            _check_scene(scene, np.asarray(Image.open(record.image)))


def _check_scene(scene: synthetic.Scene, pixels: np.ndarray) -> None:
    """Every caption names every attribute, and the pixels show the named colour and place."""
    phrases = dict(scene.attributes)
    if "position" in phrases:
        phrases["position"] = synthetic.POSITIONS[phrases["position"]][1]
    for caption in scene.captions:
        assert all(value in caption for value in phrases.values()), (caption, phrases)
    size = pixels.shape[0]
    for thing, colour in zip(scene.things, ("colour", "colour2"), strict=False):
        x, y = (round(v * size) for v in thing.centre)
        rgb = synthetic_tasks.COLOURS[scene.attributes[colour]]
        if thing.texture == "plain" and thing.shape not in ("star", "cross"):  # solid centres
            assert np.abs(pixels[y, x].astype(int) - rgb).max() <= 25, (scene, pixels[y, x])
    if "position" in scene.attributes:
        expected = synthetic.POSITIONS[scene.attributes["position"]][0]
        assert all(abs(c - e) < 0.05 for c, e in zip(scene.things[0].centre, expected, strict=True))


def test_synthetic_tasks_differ_in_distribution(synthetic_dir):
    """1-nearest-neighbour on 4x4 thumbnails tells the tasks apart (so task keys can route)."""
    records = manifest.read_manifest(synthetic_dir / "manifest.jsonl")

    def thumbs(split: str) -> tuple[np.ndarray, np.ndarray]:
        chosen = manifest.select(records, split=split)
        pixels = [np.asarray(Image.open(r.image).resize((4, 4)), float) for r in chosen]
        labels = [synthetic.TASK_NAMES.index(r.task) for r in chosen]
        return np.stack(pixels).reshape(len(chosen), -1), np.array(labels)

    (train, train_labels), (test, test_labels) = thumbs("train"), thumbs("test")
    nearest = ((test[:, None, :] - train[None]) ** 2).sum(-1).argmin(1)
    assert (train_labels[nearest] == test_labels).mean() > 0.9


def test_synthetic_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        synthetic.main(["--help"])
    assert exit_.value.code == 0 and "--train-per-task" in capsys.readouterr().out
    synthetic.main(
        [
            "--out",
            str(tmp_path),
            "--tasks",
            "1",
            "--train-per-task",
            "3",
            "--test-per-task",
            "2",
            "--pretrain",
            "2",
            "--image-size",
            "16",
        ]
    )
    assert "shapes-colours: 6320 combinations" in capsys.readouterr().out
    assert manifest.tasks(manifest.read_manifest(tmp_path / "manifest.jsonl")) == ["shapes-colours"]
    with pytest.raises(ValueError, match=r"tasks must be in 1\.\.4"):
        synthetic.generate(tmp_path, tasks=5)


# --- loaders -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_records(synthetic_dir) -> list[Record]:
    records = manifest.read_manifest(synthetic_dir / "manifest.jsonl")
    return manifest.select(records, ["textures", "positions"], "train")


def test_loader_shapes_and_dtypes(train_records):
    batches = list(loader.make_loader(train_records, 32, batch_size=16, seed=1))
    assert [len(b.pixels) for b in batches] == [16] * 5
    first = batches[0]
    assert first.pixels.shape == (16, 3, 32, 32) and first.pixels.dtype == torch.float32
    assert first.tokens.shape == (16, 77) and first.tokens.dtype == torch.long
    assert first.image_index.dtype == torch.long
    indices = torch.cat([b.image_index for b in batches])
    assert sorted(indices.tolist()) == list(range(80))  # every image once per epoch
    index = int(first.image_index[0])
    expected = lpi.preprocess([Image.open(train_records[index].image)], 32)[0]
    assert torch.equal(first.pixels[0], expected)  # the serving path's pixels
    captions = [lpi.tokenize([c])[0] for c in train_records[index].captions]
    assert any(torch.equal(first.tokens[0], c) for c in captions)


def test_loader_workers_do_not_change_batches(train_records):
    """Two epochs with 0 and 2 (persistent) workers: identical; epochs differ from each other."""

    def epochs(workers: int, cache: bool = False) -> list[list[loader.Batch]]:
        batches = loader.make_loader(
            train_records, 32, batch_size=32, seed=5, num_workers=workers, cache=cache
        )
        assert batches.persistent_workers == (workers > 0)
        return [list(batches) for _ in range(2)]

    serial, parallel, cached = epochs(0), epochs(2), epochs(0, cache=True)
    for left, right in ((serial, parallel), (serial, cached)):
        for epoch_a, epoch_b in zip(left, right, strict=True):
            for a, b in zip(epoch_a, epoch_b, strict=True):
                assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(serial[0][0].image_index, serial[1][0].image_index)


def test_sampler_without_shuffle_keeps_order_but_varies_captions():
    sampler = loader.CaptionSampler(6, shuffle=False, seed=0)
    first, second = list(sampler), list(sampler)
    assert [i for i, _ in first] == [i for i, _ in second] == list(range(6))
    assert [d for _, d in first] != [d for _, d in second]


def test_eval_set_enumerates_every_caption(synthetic_dir):
    records = manifest.select(
        manifest.read_manifest(synthetic_dir / "manifest.jsonl"), split="test"
    )
    gallery = loader.eval_set(records, 32)
    assert gallery.pixels.shape == (80, 3, 32, 32)
    assert len(gallery.captions) == gallery.caption_to_image.numel() == 3 * 80
    for caption, owner in zip(gallery.captions, gallery.caption_to_image.tolist(), strict=True):
        assert caption in records[owner].captions
    chunks = list(loader.image_batches(records, 32, batch_size=30))
    assert [len(c) for c in chunks] == [30, 30, 20]
    assert torch.equal(torch.cat(chunks), gallery.pixels)
    with pytest.raises(ValueError, match="at least one record"):
        loader.eval_set([], 32)


# --- Fashion-MNIST -----------------------------------------------------------------------------
