"""The synthetic "bench" suite, the true task similarity, combining with Fashion-MNIST, and the
classic suite left byte for byte as it was (the demo bundle and tests depend on it)."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lpi.continual.data import (
    combine,
    fashion_mnist,
    manifest,
    synthetic,
    synthetic_bench,
    synthetic_tasks,
)
from lpi.continual.similarity import read_similarity
from lpi.tokenizer import tokenize

SMALL = dict(train_per_task=6, val_per_task=5, test_per_task=8, pretrain=12, image_size=32)


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    synthetic.generate(out, seed=2, suite="bench", **SMALL)
    return out


def _similarity(folder: Path) -> tuple[list[str], np.ndarray]:
    """The tasks and similarity matrix a generator wrote to task_similarity.json, read (and
    validated) as the trainer reads it; its tasks are those of task_families.json."""
    given = read_similarity(folder / "task_similarity.json")
    assert list(given.tasks) == list(json.loads((folder / "task_families.json").read_text()))
    return list(given.tasks), np.array(given.matrix)


def test_bench_suite_writes_train_val_test_of_six_tasks(bench_dir):
    records = manifest.read_manifest(bench_dir / "manifest.jsonl")
    assert manifest.tasks(records) == list(synthetic_bench.BENCH_TASK_NAMES)
    assert len(synthetic_bench.BENCH_TASK_NAMES) == 6
    sizes = {key: len(group) for key, group in manifest.group(records).items()}
    for task in synthetic_bench.BENCH_TASK_NAMES:
        assert [sizes[task, s] for s in ("train", "val", "test")] == [6, 5, 8]
        for split in ("val", "test"):  # evaluated splits: every caption names one image
            assert synthetic.unique_fraction(manifest.select(records, task, split)) == 1.0
    summary = json.loads((bench_dir / "synthetic.json").read_text())
    assert summary["suite"] == "bench" and summary["val_per_task"] == 5
    assert min(summary["combinations"][t] for t in synthetic_bench.BENCH_TASK_NAMES) >= 500


def test_bench_defaults_and_bad_suite(tmp_path):
    _, tasks, (train, val, test) = synthetic.SUITES["bench"]
    assert (train, val, test) == (1000, 200, 500) and len(tasks) == 6
    assert synthetic.SUITES["classic"][2] == (1000, 0, 200)
    with pytest.raises(ValueError, match="suite must be one of"):
        synthetic.generate(tmp_path, suite="nope")
    with pytest.raises(ValueError, match=r"tasks must be in 1\.\.6"):
        synthetic.generate(tmp_path, tasks=7, suite="bench")


def test_true_similarity_is_the_jaccard_of_task_families(bench_dir):
    tasks, matrix = _similarity(bench_dir)
    families = json.loads((bench_dir / "task_families.json").read_text())
    assert tasks == list(families) == list(synthetic_bench.BENCH_TASK_NAMES)
    for i, a in enumerate(tasks):  # an independent Jaccard over the recorded families
        for j, b in enumerate(tasks):
            union = set(families[a]) | set(families[b])
            assert matrix[i, j] == pytest.approx(
                len(set(families[a]) & set(families[b])) / len(union), abs=1e-4
            )
    assert np.allclose(matrix, matrix.T) and np.all(np.diag(matrix) == 1)
    index = {t: i for i, t in enumerate(tasks)}
    assert matrix[index["sizes-backgrounds"], index["backgrounds-positions"]] > 0  # background
    assert matrix[index["textures"], index["backgrounds-positions"]] == 0  # nothing shared
    assert not matrix[index["counts"]][[i for t, i in index.items() if t != "counts"]].any()
    assert not matrix[index["shapes-colours"]][
        [i for t, i in index.items() if t != "shapes-colours"]
    ].any()


def test_bench_captions_name_what_is_drawn(bench_dir):
    records = manifest.read_manifest(bench_dir / "manifest.jsonl")
    for name in ("backgrounds-positions", "counts"):
        scenes = synthetic.make_scenes(name, "test", 8, seed=2)
        kept = manifest.select(records, name, "test")
        assert [r.captions for r in kept] == [s.captions for s in scenes]
        for scene in scenes:
            for caption in scene.captions:
                assert scene.attributes["colour"] in caption
                words = [scene.attributes.get(k) for k in ("background", "count", "arrangement")]
                assert all(w in caption for w in words if w)
            if name == "counts":
                assert len(scene.things) == synthetic_bench.COUNTS[scene.attributes["count"]]
                assert synthetic_bench.plural(scene.attributes["shape"]) in scene.captions[0]
                assert scene.style == "grid"  # a felt far from positions' slate grid
                assert np.linalg.norm(np.subtract(scene.ground, (70, 80, 95))) > 90
                xs, ys = np.array([thing.centre for thing in scene.things]).T
                across, along = (ys, xs) if scene.attributes["arrangement"] == "row" else (xs, ys)
                assert np.ptp(across) <= 0.04  # one line, up to the jitter
                gaps = np.diff(np.sort(along))  # evenly spaced, up to each centre's jitter
                assert gaps.min() >= 1 / len(scene.things) - 0.04 - 1e-9
    faded = manifest.select(records, "backgrounds-positions", "train")
    top, bottom = (
        np.mean([np.asarray(Image.open(r.image), float)[row].mean() for r in faded])
        for row in (0, -1)
    )
    assert bottom < 0.85 * top  # its grounds fade towards the bottom


def _tokens(captions) -> set[int]:
    return set(tokenize(list(captions)).unique().tolist())


def test_pretraining_captions_use_every_token_the_tasks_use():
    """No task token keeps its random initial embedding: task tokens are pretraining tokens."""
    pretrain = synthetic.make_scenes("pretrain-bench", "train", 3000, seed=0)
    seen = _tokens(c for s in pretrain for c in s.captions)
    for name in synthetic_bench.BENCH_TASK_NAMES:
        scenes = synthetic.make_scenes(name, "test", 300, seed=0)
        used = _tokens(c for s in scenes for c in s.captions)
        assert used <= seen, (name, sorted(used - seen))
    counted = [s for s in pretrain if "count" in s.attributes]
    lines = [s for s in counted if "arrangement" in s.attributes]
    assert 0.3 < len(lines) / len(counted) < 0.7  # rows and columns, and unnamed grids


def test_fashion_pretraining_teaches_every_garment_word_from_unused_images(tmp_path, monkeypatch):
    root = _fake_fashion(tmp_path / "idx")  # random pixels: each source image is unique
    sources: dict[str, list[bytes]] = {"task": [], "pretrain": []}
    blend = fashion_mnist.blend

    def task_tint(image, colour, background):
        sources["task"].append(image.tobytes())
        return blend(image, fashion_mnist.COLOURS[colour], fashion_mnist.BACKGROUNDS[background])

    def pretrain_blend(image, colour, ground):
        sources["pretrain"].append(image.tobytes())
        return blend(image, colour, ground)

    with monkeypatch.context() as patch:
        patch.setattr(fashion_mnist, "tint", task_tint)
        patch.setattr(fashion_mnist, "blend", pretrain_blend)
        fashion_mnist.generate(tmp_path / "f", root, 8, 4, seed=3, val_per_task=4, pretrain=40)
    assert len(sources["pretrain"]) == 40 == len(set(sources["pretrain"]))
    assert not set(sources["task"]) & set(sources["pretrain"])  # no task image reused
    tasks = manifest.read_manifest(tmp_path / "f" / "manifest.jsonl")
    pretrain = manifest.read_manifest(tmp_path / "f" / "pretrain.jsonl")
    assert len(pretrain) == 40 and {r.task for r in pretrain} == {fashion_mnist.PRETRAIN_TASK}
    assert {r.split for r in pretrain} == {"train"}
    garments = [next(c for c in fashion_mnist.CLASSES if c in r.captions[0]) for r in pretrain]
    assert set(garments) == set(fashion_mnist.CLASSES)  # all ten classes
    # The backbone pretrains on this and the synthetic set together (combine), which has "with".
    bench = synthetic.make_scenes("pretrain-bench", "train", 3000, seed=0)
    words = _tokens(c for r in pretrain for c in r.captions) | _tokens(
        c for s in bench for c in s.captions
    )
    for task in fashion_mnist.TASKS:
        assert _tokens(c for r in manifest.select(tasks, task) for c in r.captions) <= words
    named = [r for r in pretrain if any("background" in c for c in r.captions)]
    assert 0 < len(named) < len(pretrain)  # some grounds named, the rest unnamed
    plain = tmp_path / "plain"  # asking for pretraining leaves the tasks' data as it was
    fashion_mnist.generate(plain, root, 8, 4, seed=3, val_per_task=4)
    assert not (plain / "pretrain.jsonl").exists()
    again = manifest.read_manifest(plain / "manifest.jsonl")
    assert [r.captions for r in again] == [r.captions for r in tasks]
    assert [r.image.read_bytes() for r in again] == [r.image.read_bytes() for r in tasks]
    with pytest.raises(ValueError, match="not enough unused"):
        fashion_mnist.generate(tmp_path / "big", root, 8, 4, seed=3, pretrain=400)
    with pytest.raises(ValueError, match="pretrain must be >= 0"):
        fashion_mnist.generate(tmp_path / "negative", root, 8, 4, pretrain=-1)


def test_pretraining_grounds_vary_and_name_backgrounds():
    scenes = synthetic.make_scenes("pretrain-bench", "train", 400, seed=1)
    named = [s for s in scenes if "background" in s.attributes]
    assert 0.3 < len(named) / len(scenes) < 0.5
    palettes = {**synthetic_bench.BACKGROUNDS, **synthetic_bench.BACKGROUNDS_2}
    assert {s.attributes["background"] for s in named} == set(palettes)
    unnamed = np.array([s.ground for s in scenes if "background" not in s.attributes], float)
    assert unnamed.std(0).min() > 40  # not one grey: every channel spreads
    assert {s.style for s in scenes} == {"plain", "grid", "fade"}
    for scene in scenes:  # every object stands out from its ground
        for key in ("colour", "colour2"):
            if key in scene.attributes:
                rgb = synthetic_tasks.COLOURS[scene.attributes[key]]
                assert (
                    np.linalg.norm(np.subtract(rgb, scene.ground))
                    >= synthetic_tasks.MIN_CONTRAST - 20
                )


def test_classic_suite_is_byte_for_byte_unchanged(tmp_path):
    """The digest of what the generator wrote before suites and val splits existed."""
    synthetic.generate(tmp_path, 4, 12, 6, 10, 32, 5)
    digest = hashlib.sha256()
    for path in sorted([*tmp_path.glob("*.jsonl"), *tmp_path.rglob("*.png")]):
        digest.update(str(path.relative_to(tmp_path)).encode())
        digest.update(path.read_bytes())
    expected = "84420ed06e79b7eb7636ce737f5a502996daafcdfdaf8d98badb6329256ecda6"
    assert digest.hexdigest() == expected
    assert not manifest.select(manifest.read_manifest(tmp_path / "manifest.jsonl"), split="val")


def _fake_fashion(root: Path, per_class: int = 30) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        labels = np.repeat(np.arange(10), per_class)
        images = rng.integers(0, 256, (len(labels), 28, 28)).astype(np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels.astype(np.uint8))):
            header = bytes([0, 0, 0x08, array.ndim])
            header += b"".join(n.to_bytes(4, "big") for n in array.shape)
            with gzip.open(root / f"{prefix}-{kind}-ubyte.gz", "wb") as file:
                file.write(header + array.tobytes())
    return root


def test_fashion_val_never_reuses_a_train_image_and_train_is_unchanged(tmp_path):
    root = _fake_fashion(tmp_path / "idx")
    fashion_mnist.generate(tmp_path / "plain", root, 10, 6, seed=1)
    fashion_mnist.generate(tmp_path / "val", root, 10, 6, seed=1, val_per_task=8)
    plain = manifest.read_manifest(tmp_path / "plain" / "manifest.jsonl")
    with_val = manifest.read_manifest(tmp_path / "val" / "manifest.jsonl")
    for split in ("train", "test"):  # asking for val leaves train and test as they were
        a, b = manifest.select(plain, split=split), manifest.select(with_val, split=split)
        assert [r.captions for r in a] == [r.captions for r in b]
        assert all(x.image.read_bytes() == y.image.read_bytes() for x, y in zip(a, b, strict=True))
    for task in fashion_mnist.TASKS:
        train = {r.image.read_bytes() for r in manifest.select(with_val, task, "train")}
        val = manifest.select(with_val, task, "val")
        assert len(val) == 8 and not train & {r.image.read_bytes() for r in val}
        assert synthetic.unique_fraction(val) == 1.0
    tasks, matrix = _similarity(tmp_path / "val")
    assert tasks == list(fashion_mnist.TASKS)
    assert np.allclose(matrix, np.full((3, 3), 1 / 3) + np.eye(3) * (2 / 3), atol=1e-4)


def test_fashion_cli_names_the_package_when_absent(tmp_path, caplog):
    assert fashion_mnist.main(["--out", str(tmp_path / "o"), "--root", str(tmp_path)]) == 2
    assert fashion_mnist.PACKAGE in caplog.text
    assert not fashion_mnist.available(tmp_path)


def test_combine_appends_fashion_to_the_bench_suite(bench_dir, tmp_path, caplog):
    fashion_mnist.generate(tmp_path / "fashion", _fake_fashion(tmp_path / "idx"), 6, 4)
    order = combine.combine(
        tmp_path / "all", [bench_dir], optional=[tmp_path / "fashion", tmp_path / "absent"]
    )
    assert "skipping" in caplog.text and str(tmp_path / "absent") in caplog.text
    assert order == [*synthetic_bench.BENCH_TASK_NAMES, *fashion_mnist.TASKS]
    records = manifest.read_manifest(tmp_path / "all" / "manifest.jsonl")
    assert manifest.tasks(records) == order
    pretrain = manifest.read_manifest(tmp_path / "all" / "pretrain.jsonl")
    assert {r.task for r in pretrain} == {"pretrain-bench"}
    tasks, matrix = _similarity(tmp_path / "all")
    index = {t: i for i, t in enumerate(tasks)}
    assert matrix[index["tops"], index["sizes-backgrounds"]] == pytest.approx(1 / 3, abs=1e-4)
    assert matrix[index["tops"], index["textures"]] == 0
    kept = combine.combine(tmp_path / "some", [bench_dir, tmp_path / "fashion"], ["tops", "counts"])
    assert kept == ["counts", "tops"]  # the parts' order
    with pytest.raises(ValueError, match="also in an earlier part"):
        combine.combine(tmp_path / "twice", [bench_dir, bench_dir])
    with pytest.raises(ValueError, match="unknown task"):
        combine.combine(tmp_path / "bad", [bench_dir], ["nope"])
