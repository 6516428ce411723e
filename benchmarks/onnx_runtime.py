"""onnxruntime vs torch on this CPU: the exported towers against the backbone they came from.

Random weights (nothing is downloaded). Each preset is exported once (float32, J = min(9,
depth), N = 16) into a temporary folder, then both runtimes are timed side by side in one run,
round-robin, with the same thread count, on the same inputs: no task (onnxruntime gets zero
prefixes with every row's flag off, torch gets prefix=None) and one task (the same prefix keys
and values for both). Texts are padded to the batch's longest, as the serving engine sends them.
Inputs are prepared before timing; the timed call is the forward pass alone.

    python benchmarks/onnx_runtime.py --presets tiny ViT-B-16 --batches 1 8
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from benchkit import time_calls, write_json

import lpi
from export.onnx_export import OnnxTowers, export_towers

CAPTIONS = [
    "a photo of a red car parked on the street",
    "two dogs playing with a ball in the park",
    "a plate of food with vegetables and rice",
    "a man riding a wave on top of a surfboard",
]
MODES = ("none", "one task")
TOKENS = 16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "ViT-B-16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per cell (median)")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=1.0,
        help="repeat small cells until each timing spans at least this long",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="intra-op threads for both runtimes (default: torch's)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/onnx_runtime.json"))
    return parser.parse_args()


def one_task_prefixes(backbone: lpi.Backbone, layers: int, batch: int):
    torch.manual_seed(100)
    bank = lpi.PromptBank()
    config = lpi.PromptConfig(layers=layers, tokens=TOKENS, rank=4)
    bank.add("task0", lpi.TaskPrompts.for_backbone(config, backbone))
    return bank.prefixes(backbone, ["task0"] * batch)  # (image, text) Prefix, [J, B, N, D]


def bench_preset(name: str, args: argparse.Namespace, work: Path) -> list[dict]:
    backbone = lpi.load_backbone(name)
    layers = min(9, backbone.config.vision.layers, backbone.config.text.layers)
    start = time.perf_counter()
    export_towers(backbone, work / name, layers, TOKENS, fp16=False)
    print(f"{name}: exported and checked in {time.perf_counter() - start:.0f} s", flush=True)
    towers = OnnxTowers(
        work / name, backbone=backbone, providers=["CPUExecutionProvider"], threads=args.threads
    )
    print(HEADER, flush=True)
    size = backbone.config.vision.image_size
    rows = []
    for batch in args.batches:
        generator = torch.Generator().manual_seed(batch)
        pixels = torch.randn(batch, 3, size, size, generator=generator)
        tokens = lpi.tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)])
        tokens = tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]  # padded to the longest
        with torch.inference_mode():
            prefixes = one_task_prefixes(backbone, layers, batch)
            for modality, data in (("image", pixels), ("text", tokens)):
                fns = cells(backbone, towers, modality, data, prefixes[modality == "text"])
                seconds = time_calls(fns, args.repeats, args.min_seconds)
                rows.append(summarise(name, modality, batch, seconds))
                print_row(rows[-1])
    return rows


def cells(backbone, towers: OnnxTowers, modality: str, data: torch.Tensor, prefix) -> dict:
    """torch and onnxruntime calls on the same prepared inputs (numpy for onnxruntime)."""
    encode = backbone.encode_image if modality == "image" else backbone.encode_text
    run = towers.encode_image if modality == "image" else towers.encode_text
    array = data.numpy()
    keys, values = prefix.keys.numpy(), prefix.values.numpy()
    return {
        "torch none": partial(encode, data, None),
        "onnx none": partial(run, array),
        "torch one task": partial(encode, data, prefix),
        "onnx one task": partial(run, array, keys, values),
    }


def summarise(preset: str, modality: str, batch: int, seconds: dict[str, float]) -> dict:
    return {
        "preset": preset,
        "modality": modality,
        "batch": batch,
        "seconds": seconds,
        "items_per_s": {k: batch / v for k, v in seconds.items()},
        "onnx_speedup": {  # onnxruntime items/s over torch items/s: > 1 is onnxruntime faster
            mode: seconds[f"torch {mode}"] / seconds[f"onnx {mode}"] for mode in MODES
        },
    }


HEADER = (
    f"{'preset':<9} {'mod':<5} {'B':>3} | {'torch none':>10} {'onnx none':>10} {'onnx/torch':>10} "
    f"| {'torch 1task':>11} {'onnx 1task':>10} {'onnx/torch':>10}"
)


def print_row(row: dict) -> None:
    ips, speedup = row["items_per_s"], row["onnx_speedup"]
    print(
        f"{row['preset']:<9} {row['modality']:<5} {row['batch']:>3} | "
        f"{ips['torch none']:>10.1f} {ips['onnx none']:>10.1f} {speedup['none']:>10.2f} | "
        f"{ips['torch one task']:>11.1f} {ips['onnx one task']:>10.1f} "
        f"{speedup['one task']:>10.2f}",
        flush=True,
    )


def machine_info(threads: int) -> dict:
    import onnxruntime

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    machine = machine_info(args.threads)
    print(f"machine: {machine}")
    print("items/s per runtime; onnx/torch = onnxruntime's items/s over torch's (>1: faster)")
    with tempfile.TemporaryDirectory(prefix="lpi-onnx-bench-") as work:
        rows = [row for name in args.presets for row in bench_preset(name, args, Path(work))]
    machine["load_average_at_end"] = os.getloadavg()
    write_json(args.out, {"machine": machine, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
