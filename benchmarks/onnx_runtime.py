"""onnxruntime vs torch on this CPU: the exported towers (float32 and int8) against the backbone.

Random weights (nothing is downloaded). Each preset is exported once (J = min(9, depth),
N = 16; float32 by the TorchScript exporter and its dynamic int8 quantisation, each checked
at export) into a temporary folder, then every runtime is timed side by side in one run,
round-robin, with the same thread count, on the same inputs: no task (onnxruntime gets zero
prefixes with every row's flag off, torch gets prefix=None) and one task (the same prefix keys
and values for all). Texts are padded to the batch's longest, as the serving engine sends them.
Inputs are prepared before timing; the timed call is the forward pass alone. Each row reports
the worst per-row cosine of each graph against torch float32 and the core's matmul floor.

    python benchmarks/onnx_runtime.py --presets tiny ViT-B-32 ViT-B-16 --batches 1 8 --threads 1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from benchkit import time_calls, write_json
from floor import setup

import lpi
from export.onnx_export import export_towers
from export.onnx_runtime import OnnxTowers

CAPTIONS = [
    "a photo of a red car parked on the street",
    "two dogs playing with a ball in the park",
    "a plate of food with vegetables and rice",
    "a man riding a wave on top of a surfboard",
]
MODES = ("none", "one task")
RUNTIMES = ("torch", "onnx", "onnx int8")  # torch float32, onnxruntime float32 and int8
TOKENS = 16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "ViT-B-32", "ViT-B-16"])
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
        default=1,
        help="intra-op threads for every runtime (default 1)",
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
    export_towers(backbone, work / name, layers, TOKENS, fp16=False, quantize="int8")
    print(f"{name}: exported and checked in {time.perf_counter() - start:.0f} s", flush=True)
    towers = {
        runtime: OnnxTowers(
            work / name,
            backbone=backbone,
            providers=["CPUExecutionProvider"],
            threads=args.threads,
            precision=precision,
        )
        for runtime, precision in (("onnx", "float32"), ("onnx int8", "int8"))
    }
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
                outputs = {cell: torch.as_tensor(fn()) for cell, fn in fns.items()}
                seconds = time_calls(fns, args.repeats, args.min_seconds)
                rows.append(summarise(name, modality, batch, seconds, outputs))
                print_row(rows[-1])
    return rows


def cells(backbone, towers: dict, modality: str, data: torch.Tensor, prefix) -> dict:
    """torch and onnxruntime calls on the same prepared inputs (numpy for onnxruntime)."""
    encode = backbone.encode_image if modality == "image" else backbone.encode_text
    array = data.numpy()
    keys, values = prefix.keys.numpy(), prefix.values.numpy()
    fns = {
        "torch none": partial(encode, data, None),
        "torch one task": partial(encode, data, prefix),
    }
    for runtime, tower in towers.items():
        run = tower.encode_image if modality == "image" else tower.encode_text
        fns[f"{runtime} none"] = partial(run, array)
        fns[f"{runtime} one task"] = partial(run, array, keys, values)
    return fns


def summarise(preset, modality, batch, seconds: dict, outputs: dict) -> dict:
    return {
        "preset": preset,
        "modality": modality,
        "batch": batch,
        "seconds": seconds,
        "items_per_s": {k: batch / v for k, v in seconds.items()},
        "speedup_over_torch": {  # items/s over torch float32's, same mode: > 1 is faster
            f"{runtime} {mode}": seconds[f"torch {mode}"] / seconds[f"{runtime} {mode}"]
            for runtime in RUNTIMES
            for mode in MODES
        },
        "prompted_over_bare": {  # time ratio: 1 = a task costs nothing
            runtime: seconds[f"{runtime} one task"] / seconds[f"{runtime} none"]
            for runtime in RUNTIMES
        },
        "min_cosine_vs_torch": {
            cell: float(F.cosine_similarity(out, outputs[_torch_cell(cell)]).min())
            for cell, out in outputs.items()
        },
    }


def _torch_cell(cell: str) -> str:
    return "torch one task" if cell.endswith("one task") else "torch none"


HEADER = (
    f"{'preset':<9} {'mod':<5} {'B':>3} | {'torch/s':>8} {'onnx/s':>8} {'int8/s':>8} | "
    f"{'onnx/t':>6} {'int8/t':>6} {'int8 cos':>8} | {'1task/bare t,onnx,int8':>22}"
)


def print_row(row: dict) -> None:
    ips, up, ratio = row["items_per_s"], row["speedup_over_torch"], row["prompted_over_bare"]
    cosine = min(v for k, v in row["min_cosine_vs_torch"].items() if k.startswith("onnx int8"))
    print(
        f"{row['preset']:<9} {row['modality']:<5} {row['batch']:>3} | "
        f"{ips['torch none']:>8.2f} {ips['onnx none']:>8.2f} {ips['onnx int8 none']:>8.2f} | "
        f"{up['onnx none']:>6.2f} {up['onnx int8 none']:>6.2f} {cosine:>8.5f} | "
        + " ".join(f"{ratio[r]:>6.3f}" for r in RUNTIMES),
        flush=True,
    )


def main() -> None:
    args = parse_args()
    import onnxruntime

    machine = setup(args.threads, onnxruntime=onnxruntime.__version__)
    print(
        "items/s with no task; onnx/t, int8/t: over torch float32's items/s (>1: faster); int8 "
        "cos: worst per-row cosine against torch float32; 1task/bare: prompted time over bare"
    )
    with tempfile.TemporaryDirectory(prefix="lpi-onnx-bench-") as work:
        rows = [row for name in args.presets for row in bench_preset(name, args, Path(work))]
    machine["load_average_at_end"] = os.getloadavg()
    write_json(args.out, {"machine": machine, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
