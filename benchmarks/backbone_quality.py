"""What a frozen backbone gives a continual benchmark before any prompt: zero-shot recall@1 of
every task's own gallery, and routing accuracy by task keys at several centre counts.

Zero-shot R@1 is the mean of image->text and text->image R@1 on each task's test (or val)
gallery, unprompted. Routing fits each task's keys as the trainer does (K-Means centres of the
frozen features of its training data; `--key-centres` of `python -m lpi.train`) and routes
every test image and caption of every task to the nearest centre of all tasks, as the final
evaluation of a continual run does. Accuracy is the percent routed to their own task, overall
and per task. The paper fixes 5 centres; this shows what more would change without training
anything. Several manifests (one per seed) give mean and std.

    python benchmarks/backbone_quality.py --backbone cache/bench-.../backbone.safetensors \
        --manifest data/seed-0/manifest.jsonl data/seed-1/manifest.jsonl \
        --centres 5 10 20 --out docs/backbone_quality_bench.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from benchkit import table, write_json
from continual_report import cell, stats

from lpi.checkpoint import load_backbone
from lpi.continual import recall as recall_metrics
from lpi.continual.data.loader import eval_set
from lpi.continual.data.manifest import read_manifest, select, tasks
from lpi.continual.evaluation import (
    fit_keys,
    frozen_features,
    headline_r1,
    key_features,
    make_test_set,
    route_queries,
    routing_confusion,
)
from lpi.continual.flags import DefaultsHelp
from lpi.routing import CLUSTERS

MODALITIES = ("image", "text")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=DefaultsHelp
    )
    parser.add_argument("--backbone", type=Path, required=True, help=".safetensors backbone")
    parser.add_argument(
        "--manifest",
        type=Path,
        nargs="+",
        required=True,
        help="the tasks' manifest(s), one per seed",
    )
    parser.add_argument("--split", default="test", help="gallery split (test or val)")
    parser.add_argument(
        "--centres",
        type=int,
        nargs="+",
        default=[CLUSTERS],
        help="K-Means centres per task and modality to measure routing at",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, help="JSON result; None prints only")
    args = parser.parse_args(argv)
    if min(args.centres) < 1:
        parser.error("--centres: each count must be at least 1")
    return args


def measure_manifest(backbone, manifest: Path, split: str, centres: list[int]) -> dict:
    """One data set: per task gallery size and zero-shot R@1; per centre count, routing accuracy
    per modality and the percent of each task's queries routed to itself."""
    size = backbone.config.vision.image_size
    records = read_manifest(manifest)
    names = tasks(records)
    train = {t: key_features(backbone, select(records, t, "train")) for t in names}
    sets = {t: make_test_set(*eval_set(select(records, t, split), size)) for t in names}
    queries = {t: frozen_features(backbone, sets[t]) for t in names}
    galleries = {t: (*queries[t], sets[t].caption_to_image) for t in names}
    recall = recall_metrics.task_and_union_recall(galleries)
    zero_shot = {t: headline_r1(recall[t]["task"]) for t in names}
    routing = {}
    for count in centres:
        image_rows, text_rows, accuracy = route_queries(fit_keys(train, count), queries)
        right = {}
        for modality, rows in (("image", image_rows), ("text", text_rows)):
            confusion = routing_confusion(rows)
            right[modality] = {t: confusion[t].get(t, 0.0) for t in names}
        routing[count] = {"accuracy": accuracy, "own_task": right}
    rows = [{"task": t, "gallery": len(sets[t].pixels), "r1": zero_shot[t]} for t in names]
    return {
        "manifest": f"{manifest.parent.name}/{manifest.name}",  # no machine paths
        "tasks": rows,
        "mean_r1": statistics.fmean(row["r1"] for row in rows),
        "routing": routing,
    }


def summarise(per_manifest: list[dict], centres: list[int]) -> list[dict]:
    """Per centre count: accuracy per modality and per task, mean and std over the manifests."""
    names = [row["task"] for row in per_manifest[0]["tasks"]]
    summary = []
    for count in centres:
        runs = [m["routing"][count] for m in per_manifest]
        row = {"centres": count}
        for modality in MODALITIES:
            row[modality] = stats([r["accuracy"][modality] for r in runs])
            row[f"{modality}_own_task"] = {
                t: statistics.fmean(r["own_task"][modality].get(t, 0.0) for r in runs)
                for t in names
            }
        summary.append(row)
    return summary


def print_tables(per_manifest: list[dict], summary: list[dict]) -> None:
    for result in per_manifest:
        print(result["manifest"])
        print(table([("task", "{}"), ("gallery", "{}"), ("r1", "{:.1f}")], result["tasks"]))
        print(f"mean zero-shot R@1 {result['mean_r1']:.1f}")
    names = [row["task"] for row in per_manifest[0]["tasks"]]
    rows = [
        {
            "centres": row["centres"],
            "image": cell(row["image"], 1, True),
            "text": cell(row["text"], 1, True),
            **{t: f"{row['image_own_task'][t]:.0f}/{row['text_own_task'][t]:.0f}" for t in names},
        }
        for row in summary
    ]
    columns = [("centres", "{}"), ("image", "{}"), ("text", "{}"), *((t, "{}") for t in names)]
    print(f"routing accuracy (%, mean ± std over {len(per_manifest)}); per task image/text")
    print(table(columns, rows))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load = os.getloadavg()
    backbone = load_backbone(args.backbone, device="cpu")
    centres = sorted(set(args.centres))
    per_manifest = [measure_manifest(backbone, m, args.split, centres) for m in args.manifest]
    summary = summarise(per_manifest, centres)
    print_tables(per_manifest, summary)
    if args.out:
        payload = {
            "routing": summary,
            "per_manifest": per_manifest,
            "backbone": f"{args.backbone.parent.name}/{args.backbone.name}",  # no machine paths
            "split": args.split,
            "threads": args.threads,
            "load_average_at_start": load,
            "seconds": round(time.perf_counter() - start, 1),
        }
        write_json(args.out, payload)


if __name__ == "__main__":
    main()
