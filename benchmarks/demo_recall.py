"""The demo's recall per task through each serving path: torch float32 / bfloat16, ONNX
float32 / int8. What a lower precision costs in retrieval, on a trained backbone.

Builds (or reuses) the server's demo bundle, exports its backbone to ONNX (float32 and int8,
the tasks' J and N), loads every task into each engine and encodes each task's test items
(images and their captions) with that task's prompts. Recall@1/5/10 both ways per task, and
each path's worst per-row cosine against torch float32; the bundle's galleries are 50 items
(chance recall@10: 20 %), so one item is 2 points.

    python benchmarks/demo_recall.py --data-dir data/bench-demo
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from benchkit import write_json
from floor import machine_info
from PIL import Image

import lpi
from export import read_artifact
from export.onnx_export import export_towers
from lpi.continual.recall import retrieval_recall
from server.demo import SIZES, ensure_demo_bundle
from server.engine import build_engine

PATHS = {  # name -> build_engine arguments
    "torch float32": {"kind": "torch", "dtype": "float32"},
    "torch bfloat16": {"kind": "torch", "dtype": "bfloat16"},
    "onnx float32": {"kind": "onnx", "precision": "float32"},
    "onnx int8": {"kind": "onnx", "precision": "int8"},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("data/bench-demo"),
        help="the demo bundle's folder, built if missing",
    )
    parser.add_argument("--size", choices=SIZES, default="full", help="demo size (default full)")
    parser.add_argument("--tasks", type=int, default=3, help="demo tasks (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/demo_recall.json"))
    return parser.parse_args()


def encode_task(engine, key, pixels, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    keys = [key] * len(pixels)
    return engine.encode("image", pixels, keys), engine.encode("text", tokens, keys)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    machine = machine_info(args.threads)
    print(f"machine: {machine}")
    bundle = ensure_demo_bundle(args.data_dir / "demo", tasks=args.tasks, sizes=SIZES[args.size])
    backbone = lpi.load_backbone(bundle.backbone)
    fingerprint = lpi.fingerprint(backbone)
    artifacts = {task: read_artifact(path, backbone) for task, path in bundle.artifacts.items()}
    first = next(iter(artifacts.values())).meta
    size = backbone.config.vision.image_size
    inputs = {
        task: (
            lpi.preprocess([Image.open(item.image).convert("RGB") for item in items], size),
            lpi.tokenize([item.caption for item in items]),
        )
        for task, items in bundle.items.items()
    }
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="lpi-demo-recall-") as work:
        export_towers(backbone, work, first["layers"], first["tokens"], fp16=False, quantize="int8")
        for path, options in PATHS.items():
            options = dict(options)
            engine = build_engine(
                options.pop("kind"),
                lpi.load_backbone(bundle.backbone),
                onnx_dir=work,
                threads=args.threads,
                backbone_fingerprint=fingerprint,
                **options,
            )
            results[path] = {}
            for task, artifact in artifacts.items():
                key = (task, artifact.prompt_version)
                engine.add(key, artifact)
                image, text = encode_task(engine, key, *inputs[task])
                results[path][task] = {"image": image, "text": text}
    rows = summarise(results)
    for row in rows:
        print(
            f"{row['path']:<15} {row['task']:<20} R@1/5/10 i2t {row['i2t'][1]:5.1f} "
            f"{row['i2t'][5]:5.1f} {row['i2t'][10]:5.1f}  t2i {row['t2i'][1]:5.1f} "
            f"{row['t2i'][5]:5.1f} {row['t2i'][10]:5.1f}  min cos {row['min_cosine']:.6f}"
        )
    machine["load_average_at_end"] = os.getloadavg()
    write_json(args.out, {"machine": machine, "bundle": bundle.root.name, "rows": rows})
    print(f"wrote {args.out}")


def summarise(results: dict) -> list[dict]:
    rows = []
    reference = results["torch float32"]
    for path, tasks in results.items():
        for task, out in tasks.items():
            captions = torch.arange(len(out["text"]))  # one caption per image, same order
            recall = retrieval_recall(out["image"], out["text"], captions)
            cosine = min(
                float(F.cosine_similarity(out[m], reference[task][m]).min())
                for m in ("image", "text")
            )
            rows.append({"path": path, "task": task, **recall, "min_cosine": cosine})
    return rows


if __name__ == "__main__":
    main()
