"""The demo's recall per task through each serving path: torch float32 / bfloat16, ONNX
float32 / int8. What a lower precision costs in retrieval, on a trained backbone.

Builds (or reuses) the server's demo bundle, exports its backbone to ONNX (float32 and int8,
the tasks' J and N), loads every task into each engine and encodes each task's test gallery
(images and one caption each) with that task's prompts. The bundle keeps 50 test items per
task, where one item is 2 points of recall; so the gallery here is the first `--test-items`
scenes of the same tasks' test split, regenerated from the bundle's recipe (same generator,
seed and image size: its first 50 are the bundle's own items, checked by caption), where one
item is 100 / N points. Recall@1/5/10 both ways per task and path, each path's recall@10
change against torch float32 (goal: within 1 point), and its worst per-row cosine.

    python benchmarks/demo_recall.py --data-dir data/bench-demo --test-items 500
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from benchkit import table, write_json
from floor import setup

import lpi
from export import read_artifact
from export.onnx_export import export_towers
from lpi.continual.data.drawing import render
from lpi.continual.data.synthetic import make_scenes
from lpi.continual.recall import retrieval_recall
from server.demo import SIZES, DemoBundle, DemoSizes, ensure_demo_bundle
from server.engine import build_engine

PATHS = {  # name -> build_engine arguments
    "torch float32": {"kind": "torch", "dtype": "float32"},
    "torch bfloat16": {"kind": "torch", "dtype": "bfloat16"},
    "onnx float32": {"kind": "onnx", "precision": "float32"},
    "onnx int8": {"kind": "onnx", "precision": "int8"},
}
REFERENCE = "torch float32"
GOAL_POINTS = 1.0  # recall@10 moved by at most this many points against float32
COLUMNS = [
    ("task", "{}"),
    ("path", "{}"),
    ("items", "{}"),
    ("i2t_r10", "{:.1f}"),
    ("t2i_r10", "{:.1f}"),
    ("d_i2t_r10", "{:+.1f}"),
    ("d_t2i_r10", "{:+.1f}"),
    ("i2t_r1", "{:.1f}"),
    ("t2i_r1", "{:.1f}"),
    ("min_cosine", "{:.5f}"),
    ("goal", "{}"),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("data/bench-demo"),
        help="the demo bundle's folder, built if missing",
    )
    parser.add_argument("--size", choices=SIZES, default="full", help="demo size")
    parser.add_argument("--tasks", type=int, default=3, help="demo tasks")
    parser.add_argument(
        "--test-items",
        type=int,
        default=500,
        help="gallery size per task: the test split's first N scenes (>= the bundle's own)",
    )
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/demo_recall.json"), help="JSON"
    )
    return parser.parse_args()


def galleries(
    bundle: DemoBundle, recipe: DemoSizes, count: int
) -> dict[str, tuple[list, list[str]]]:
    """Each task's first `count` test scenes as (images, first captions), as the bundle's
    generator draws them; refuses a recipe whose first scenes are not the bundle's items."""
    if count < recipe.test_per_task:
        raise SystemExit(f"--test-items must be >= the bundle's {recipe.test_per_task}")
    out = {}
    for task, items in bundle.items.items():
        scenes = make_scenes(task, "test", count, recipe.seed)
        captions = [scene.captions[0] for scene in scenes]
        if captions[: len(items)] != [item.caption for item in items]:
            raise SystemExit(f"{task}: the regenerated test split does not start with the bundle's")
        if len(set(captions)) != len(captions):
            raise SystemExit(f"{task}: {count} test scenes repeat a caption; ask for fewer")
        out[task] = ([render(scene, recipe.image_size) for scene in scenes], captions)
    return out


def encode_all(bundle: DemoBundle, inputs: dict, threads: int) -> dict:
    """Every path's unit vectors per task: {path: {task: {"image", "text"}}}."""
    backbone = lpi.load_backbone(bundle.backbone)
    fingerprint = lpi.fingerprint(backbone)
    artifacts = {task: read_artifact(path, backbone) for task, path in bundle.artifacts.items()}
    first = next(iter(artifacts.values())).meta
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="lpi-demo-recall-") as work:
        export_towers(backbone, work, first["layers"], first["tokens"], fp16=False, quantize="int8")
        for path, options in PATHS.items():
            options = dict(options)
            engine = build_engine(
                options.pop("kind"),
                lpi.load_backbone(bundle.backbone),
                onnx_dir=work,
                threads=threads,
                backbone_fingerprint=fingerprint,
                **options,
            )
            results[path] = {}
            for task, artifact in artifacts.items():
                key = (task, artifact.prompt_version)
                engine.add(key, artifact)
                pixels, tokens = inputs[task]
                keys = [key] * len(pixels)
                results[path][task] = {
                    "image": engine.encode("image", pixels, keys),
                    "text": engine.encode("text", tokens, keys),
                }
    return results


def summarise(results: dict) -> list[dict]:
    rows = []
    reference = results[REFERENCE]
    for path, tasks in results.items():
        for task, out in tasks.items():
            captions = torch.arange(len(out["text"]))  # one caption per image, same order
            recall = retrieval_recall(out["image"], out["text"], captions)
            base = retrieval_recall(reference[task]["image"], reference[task]["text"], captions)
            cosine = min(
                float(F.cosine_similarity(out[m], reference[task][m]).min())
                for m in ("image", "text")
            )
            moved = {d: recall[d][10] - base[d][10] for d in ("i2t", "t2i")}
            rows.append(
                {
                    "task": task,
                    "path": path,
                    "items": len(captions),
                    "recall": recall,
                    "i2t_r10": recall["i2t"][10],
                    "t2i_r10": recall["t2i"][10],
                    "d_i2t_r10": moved["i2t"],
                    "d_t2i_r10": moved["t2i"],
                    "i2t_r1": recall["i2t"][1],
                    "t2i_r1": recall["t2i"][1],
                    "min_cosine": cosine,
                    "goal": "met" if max(map(abs, moved.values())) <= GOAL_POINTS else "NOT met",
                }
            )
    return rows


def main() -> None:
    args = parse_args()
    machine = setup(args.threads)
    bundle = ensure_demo_bundle(args.data_dir / "demo", tasks=args.tasks, sizes=SIZES[args.size])
    size = lpi.load_backbone(bundle.backbone).config.vision.image_size
    inputs = {
        task: (lpi.preprocess(images, size), lpi.tokenize(captions))
        for task, (images, captions) in galleries(bundle, SIZES[args.size], args.test_items).items()
    }
    rows = summarise(encode_all(bundle, inputs, args.threads))
    print(table(COLUMNS, rows))
    machine["load_average_at_end"] = os.getloadavg()
    missed = [f"{r['task']} {r['path']}" for r in rows if r["goal"] != "met"]
    goal = {
        "target": f"recall@10 both ways within {GOAL_POINTS:g} point of {REFERENCE}",
        "points_per_item": 100 / args.test_items,
        "met": not missed,
        "missed": missed,
    }
    print(f"goal: {goal}")
    write_json(
        args.out,
        {"machine": machine, "bundle": bundle.root.name, "goal": goal, "rows": rows},
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
