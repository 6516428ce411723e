"""The continual benchmark's data and backbone: one dataset per seed, one backbone for all.

Per seed S, OUT/data/seed-S holds the synthetic suite drawn with seed S and, where Debian's
`dataset-fashion-mnist` is installed and groups are asked for, Fashion-MNIST's groups drawn
with the same seed, combined into one task sequence (`lpi.continual.data.combine`) with its
true task similarity. The backbone is pretrained once, on the pretraining split of
--backbone-seed's data (default 0, whichever seeds run), through the recipe-keyed cache of
`lpi.continual.pretraining`.

OUT/data/seed-S/data.json records the generation parameters and the generators' version; a
rerun asking for other data (sizes, suite, tasks, image size, Fashion groups and pretraining
images) or made by other generators is refused, naming the file, rather than reusing the old
data under the new flags. More pretraining images than asked still serve:
each split is drawn from its own seed, so the task data does not depend on that count.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
from pathlib import Path

from lpi import atomic
from lpi.continual import pretraining
from lpi.continual.data import combine, fashion_mnist, synthetic
from lpi.continual.data.manifest import read_manifest
from lpi.continual.data.manifest import tasks as tasks_in_order

log = logging.getLogger("benchmarks.continual")
# The generators' version: bumped whenever they draw other data from the same parameters
# (2: counts in rows and columns on a felt; Fashion-MNIST's pretraining split).
GENERATOR = 2
FASHION_DEFAULTS = {"train_per_task": 1000, "val_per_task": 100, "test_per_task": 100}
DATA_FILE = "data.json"


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--suite", default="bench", help="synthetic task suite, where the generator has suites")
    add("--tasks", type=int, default=None, help="synthetic tasks (default: all the suite has)")
    add(
        "--fashion-groups",
        nargs="*",
        default=["tops"],
        help="Fashion-MNIST groups appended "
        "after the synthetic tasks when the package is installed (none: pass the flag empty)",
    )
    add(
        "--fashion-pretrain",
        type=int,
        default=2000,
        help="Fashion-MNIST pretraining images (all ten classes) added to the backbone's "
        "pretraining set when groups are asked for, so it learns every garment word",
    )
    add("--train-per-task", type=int, default=None, help="default: the suite's")
    add("--val-per-task", type=int, default=None, help="default: the suite's")
    add("--test-per-task", type=int, default=None, help="default: the suite's (Fashion: 100)")
    add("--image-size", type=int, default=64, help="synthetic images' side (pixels)")
    add("--pretrain-images", type=int, default=4000)
    add("--pretrain-epochs", type=int, default=20)
    add("--preset", default="bench", help="backbone architecture to pretrain (lpi/presets)")
    add("--backbone", default=None, help="use this checkpoint or preset instead of pretraining")
    add("--backbone-cache", type=Path, default=None, help="pretrained backbones (OUT/backbones)")
    add(
        "--backbone-seed",
        type=int,
        default=0,
        help="the seed whose pretraining split (and "
        "pretraining order) makes the one backbone every seed shares",
    )


def sizes(args: argparse.Namespace) -> dict[str, int]:
    given = {
        "train_per_task": args.train_per_task,
        "val_per_task": args.val_per_task,
        "test_per_task": args.test_per_task,
    }
    return {k: v for k, v in given.items() if v is not None}


def fashion_parameters(args: argparse.Namespace) -> dict:
    """The Fashion-MNIST groups and pretraining images the data gets: none where no group is
    asked for or the package is not installed."""
    fashion = bool(args.fashion_groups) and fashion_mnist.available()
    return {
        "fashion_groups": list(args.fashion_groups) if fashion else [],
        "fashion_pretrain": args.fashion_pretrain if fashion else 0,
    }


def data_parameters(args: argparse.Namespace, seed: int, pretrain_images: int) -> dict:
    """What the data of one seed is generated from (data.json's content)."""
    return {
        "generator": GENERATOR,
        "seed": seed,
        "suite": args.suite,
        "tasks": args.tasks,
        "sizes": sizes(args),
        "image_size": args.image_size,
        "pretrain_images": pretrain_images,
        **fashion_parameters(args),
    }


def check_data(path: Path, wanted: dict) -> None:
    """SystemExit (naming data.json) unless the data there is the data `wanted` asks for."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SystemExit(
            f"{path}: no readable record of how this data was generated ({error}): "
            "delete its folder or use another --out"
        ) from error
    saved = saved if isinstance(saved, dict) else {}
    changed = [
        f"{k} {saved.get(k)!r} -> {v!r}"
        for k, v in wanted.items()
        if saved.get(k) != v
        and not (k == "pretrain_images" and isinstance(saved.get(k), int) and saved[k] >= v)
    ]
    if changed:
        raise SystemExit(
            f"{path}: the data was generated with other parameters ({', '.join(changed)}): "
            "delete its folder or use another --out"
        )


def prepare_data(args: argparse.Namespace, seed: int, pretrain_images: int) -> Path:
    """OUT/data/seed-S (generated when absent, else checked against data.json); its task
    manifest."""
    folder = args.out / "data" / f"seed-{seed}"
    manifest = folder / "manifest.jsonl"
    parameters = data_parameters(args, seed, pretrain_images)
    if manifest.exists():
        check_data(folder / DATA_FILE, parameters)
        return manifest
    fashion = bool(parameters["fashion_groups"])
    if args.fashion_groups and not fashion:
        log.warning(
            "Fashion-MNIST is not installed (%s): synthetic tasks only", fashion_mnist.PACKAGE
        )
    synthetic_folder = folder / "synthetic" if fashion else folder
    wanted = {"tasks": args.tasks, "suite": args.suite, **sizes(args)}
    # A generator without suites or val splits ignores those flags.
    known = inspect.signature(synthetic.generate).parameters
    extra = {k: v for k, v in wanted.items() if v is not None and k in known}
    synthetic.generate(
        synthetic_folder, pretrain=pretrain_images, image_size=args.image_size, seed=seed, **extra
    )
    if fashion:
        fashion_mnist.generate(
            folder / "fashion",
            seed=seed,
            pretrain=args.fashion_pretrain,
            **(FASHION_DEFAULTS | sizes(args)),
        )
        names = [*tasks_in_order(read_manifest(synthetic_folder / "manifest.jsonl"))]
        names += args.fashion_groups
        combine.combine(folder, [synthetic_folder, folder / "fashion"], tasks=names)
    atomic.write_json(folder / DATA_FILE, parameters)  # after the data: a crash regenerates it
    return manifest


def prepare_backbone(args: argparse.Namespace) -> str:
    """The shared frozen backbone: --backbone, or pretrained once on --backbone-seed's
    pretraining split (through the recipe-keyed cache, where the pretraining has one)."""
    if args.backbone:
        return args.backbone
    data = prepare_data(args, args.backbone_seed, args.pretrain_images).parent
    config = pretraining.PretrainConfig(
        manifest=data / "pretrain.jsonl",
        out=args.out / "backbone.safetensors",
        preset=args.preset,
        epochs=args.pretrain_epochs,
        seed=args.backbone_seed,
        device=args.device,
    )
    cached = getattr(pretraining, "cached_backbone", None)
    if cached is not None:
        return str(cached(config, args.backbone_cache or args.out / "backbones"))
    if not config.out.exists():
        pretraining.run_pretraining(config)
    return str(config.out)
