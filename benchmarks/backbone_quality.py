"""What a frozen backbone gives a continual benchmark before any prompt: zero-shot recall@1 of
every task's own gallery and routing accuracy by task keys.

Zero-shot R@1 is the mean of image->text and text->image R@1 on each task's test (or val)
gallery, unprompted. Routing fits each task's keys as the trainer does (K-Means centres of the
frozen features of its training data, `lpi.routing.TaskKeys`) and routes every test image and
caption to the nearest centre; accuracy is the percent routed to their own task.

    python benchmarks/backbone_quality.py --backbone cache/bench-.../backbone.safetensors \
        --manifest data/bench/manifest.jsonl --out benchmarks/results/backbone_quality.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from benchkit import table, write_json

from lpi.checkpoint import load_backbone
from lpi.continual.data.loader import eval_set
from lpi.continual.data.manifest import read_manifest, select, tasks
from lpi.continual.evaluation import evaluate_seen, make_test_set
from lpi.continual.trainer import frozen_features
from lpi.routing import TaskKeys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--backbone", type=Path, required=True, help=".safetensors backbone")
    parser.add_argument("--manifest", type=Path, required=True, help="the tasks' manifest")
    parser.add_argument("--split", default="test", help="gallery split (test or val)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, help="JSON result (default: print only)")
    return parser.parse_args(argv)


def measure(backbone_path: Path, manifest: Path, split: str) -> dict:
    """Per task: gallery size and zero-shot R@1; routing accuracy per modality, all tasks."""
    backbone = load_backbone(backbone_path, device="cpu")
    size = backbone.config.vision.image_size
    records = read_manifest(manifest)
    names = tasks(records)
    keys = TaskKeys()
    sets = {}
    for task in names:
        keys.add(task, *frozen_features(backbone, select(records, task, "train"), "cpu"))
        sets[task] = make_test_set(*eval_set(select(records, task, split), size))
    result = evaluate_seen(backbone, None, keys, sets)
    rows = [
        {"task": t, "gallery": len(sets[t].pixels), "r1": result["r1"]["oracle"][t]} for t in names
    ]
    return {
        "tasks": rows,
        "mean_r1": sum(row["r1"] for row in rows) / len(rows),
        "routing_accuracy": result["routing_accuracy"],
        "clusters": keys.clusters,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load = os.getloadavg()
    result = measure(args.backbone, args.manifest, args.split)
    routing = result["routing_accuracy"]
    print(table([("task", "{}"), ("gallery", "{}"), ("r1", "{:.1f}")], result["tasks"]))
    print(
        f"mean zero-shot R@1 {result['mean_r1']:.1f}; routing accuracy image "
        f"{routing['image']:.1f}% text {routing['text']:.1f}% ({result['clusters']} centres)"
    )
    if args.out:
        payload = {
            **result,
            "backbone": f"{args.backbone.parent.name}/{args.backbone.name}",  # no machine paths
            "manifest": f"{args.manifest.parent.name}/{args.manifest.name}",
            "split": args.split,
            "threads": args.threads,
            "load_average_at_start": load,
            "seconds": round(time.perf_counter() - start, 1),
        }
        write_json(args.out, payload)


if __name__ == "__main__":
    main()
