"""What a task costs on the server's own model call: prompted over bare time per engine path.

The serving engines (`server.engine`) as the batcher calls them, side by side in one run:
torch float32, torch bfloat16 (weights cast once; prompts through the task-slot pool and
`lpi.SlotPrefix`), onnxruntime float32 and int8 (prefixes materialised at load, gathered per
row). Random weights of the preset (nothing is downloaded) and eight random LPI tasks
(J = min(9, depth), N = 16, R = 4), folded, written and read back as artifacts, loaded into
every engine before timing. Per (tower, batch) the cells are: rows with no task (bare), every
row on one task, rows over eight tasks, and rows alternating a task and none (the visibility
mask's path). Timing is paired, since other jobs share the cores in bursts: each round runs
every path's cells back to back, and a ratio is the median over rounds of a cell's time over
its own path's bare time in the same round (the ratio of the cells' fastest rounds is
reported beside it). Goal: prompted time <= 1.11x bare (prompted/bare throughput >= 0.9) on
every path. The ONNX graphs do the same work with and without a task (a prefix of zeros
switched off per row), so their ratios show how far this run's noise moves a ratio. Each
cell's worst per-row cosine against torch float32's same cell is reported, and prompted
against bare (a task must move vectors).

    python benchmarks/serving_prompt.py --preset ViT-B-32 --batches 1 8 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from benchkit import paired_ratio, time_rounds, write_json
from floor import setup

import lpi
from export.artifact import read_artifact, write_artifact
from export.onnx_export import export_towers
from server.engine import build_engine

CAPTIONS = [
    "a photo of a red car parked on the street",
    "two dogs playing with a ball in the park",
    "a plate of food with vegetables and rice",
    "a man riding a wave on top of a surfboard",
]
PATHS = {  # name -> build_engine arguments
    "torch float32": {"kind": "torch", "dtype": "float32"},
    "torch bfloat16": {"kind": "torch", "dtype": "bfloat16"},
    "onnx float32": {"kind": "onnx", "precision": "float32"},
    "onnx int8": {"kind": "onnx", "precision": "int8"},
}
MODES = ("bare", "one task", "8 tasks", "half bare")
TASKS, TOKENS, RANK = 8, 16, 4
GOAL = 1 / 0.9  # prompted time over bare time: throughput kept >= 0.9


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--preset", default="ViT-B-32", help="backbone preset, random weights")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="rows per call")
    parser.add_argument(
        "--modalities", nargs="+", default=["image", "text"], choices=["image", "text"]
    )
    parser.add_argument(
        "--paths", nargs="+", default=list(PATHS), choices=list(PATHS), help="engine paths"
    )
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of every engine")
    parser.add_argument("--rounds", type=int, default=15, help="paired timing rounds")
    parser.add_argument(
        "--min-seconds", type=float, default=0.5, help="repeat a call until a timing spans this"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/serving_prompt.json"), help="JSON"
    )
    return parser.parse_args()


def make_artifacts(backbone: lpi.Backbone, folder: Path) -> list:
    """Eight random tasks folded and written as `python -m export` would, then read back."""
    fingerprint = lpi.fingerprint(backbone)
    layers = min(9, backbone.config.vision.layers, backbone.config.text.layers)
    config = lpi.PromptConfig(layers=layers, tokens=TOKENS, rank=RANK)
    artifacts = []
    for task in range(TASKS):
        torch.manual_seed(100 + task)
        folded = lpi.fold_task(backbone, lpi.TaskPrompts.for_backbone(config, backbone))
        path = folder / f"task{task}.safetensors"
        write_artifact(path, f"task{task}", folded, backbone, backbone_fingerprint=fingerprint)
        artifacts.append(read_artifact(path, backbone, fingerprint))
    return artifacts


def make_engines(base: lpi.Backbone, artifacts: list, folder: Path, args) -> tuple[dict, list]:
    """Every asked-for engine with every task loaded; the tasks' keys in load order."""
    fingerprint = lpi.fingerprint(base)
    if any(PATHS[path]["kind"] == "onnx" for path in args.paths):
        start = time.perf_counter()
        export_towers(
            base, folder, artifacts[0].meta["layers"], TOKENS, fp16=False, quantize="int8"
        )
        print(f"ONNX exported and checked in {time.perf_counter() - start:.0f} s", flush=True)
    keys = [(a.name, a.prompt_version) for a in artifacts]
    engines = {}
    for path in args.paths:
        options = dict(PATHS[path])
        engine = build_engine(
            options.pop("kind"),
            copy.deepcopy(base),  # the torch engine casts its backbone in place
            onnx_dir=folder,
            threads=args.threads,
            backbone_fingerprint=fingerprint,
            **options,
        )
        for key, artifact in zip(keys, artifacts, strict=True):
            engine.add(key, artifact)
        engines[path] = engine
    return engines, keys


def row_keys(keys: list, batch: int) -> dict[str, list]:
    """Each mode's per-row task keys (None: no task); modes a batch of one cannot tell apart
    from `one task` are left out."""
    modes = {
        "bare": [None] * batch,
        "one task": [keys[0]] * batch,
        "8 tasks": [keys[row % len(keys)] for row in range(batch)],
        "half bare": [keys[row % len(keys)] if row % 2 == 0 else None for row in range(batch)],
    }
    return modes if batch > 1 else {mode: modes[mode] for mode in MODES[:2]}


def bench(engines: dict, keys: list, modality: str, batch: int, args) -> dict:
    """One (tower, batch): every path x mode timed round-robin on the same inputs."""
    base = next(iter(engines.values()))
    if modality == "image":
        size = base.image_size
        data = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    else:
        data = lpi.tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)])
        data = data[:, : int(data.argmax(dim=-1).max()) + 1]  # padded as the batcher pads
    modes = row_keys(keys, batch)
    cells = {(path, mode): f"{path} {mode}" for path in engines for mode in modes}
    fns = {
        name: partial(engines[path].encode, modality, data, modes[mode])
        for (path, mode), name in cells.items()
    }
    outputs = {cell: fns[name]() for cell, name in cells.items()}
    timed = time_rounds(fns, args.rounds, args.min_seconds)
    samples = {cell: timed[name] for cell, name in cells.items()}  # seconds per round
    reference = next(iter(engines))  # the first path: torch float32 by default
    prompted = [m for m in modes if m != "bare"]
    return {
        "preset": args.preset,
        "modality": modality,
        "batch": batch,
        "rounds": args.rounds,
        "median_seconds": {
            p: {m: statistics.median(samples[p, m]) for m in modes} for p in engines
        },
        "bare_items_per_s": {p: batch / statistics.median(samples[p, "bare"]) for p in engines},
        "prompted_over_bare": {  # time ratio, paired per round: 1 = a task costs nothing
            p: {m: paired_ratio(samples[p, m], samples[p, "bare"]) for m in prompted}
            for p in engines
        },
        "prompted_over_bare_fastest": {
            p: {m: min(samples[p, m]) / min(samples[p, "bare"]) for m in prompted} for p in engines
        },
        "min_cosine_vs_reference": {
            path: {m: cosine(outputs[path, m], outputs[reference, m]) for m in modes}
            for path in engines
        },
        "reference": reference,
        # A task must move the vectors, or the prompted cells would time a no-op.
        "prompted_vs_bare_min_cosine": {
            path: cosine(outputs[path, "one task"], outputs[path, "bare"]) for path in engines
        },
    }


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The worst per-row cosine of two [B, E] batches."""
    return float(F.cosine_similarity(a, b).min())


def print_row(row: dict) -> None:
    for path, ratios in row["prompted_over_bare"].items():
        worst = max(ratios.values())
        fastest = max(row["prompted_over_bare_fastest"][path].values())
        cosines = row["min_cosine_vs_reference"][path]
        print(
            f"{row['modality']:<5} {row['batch']:>3} {path:<15} | "
            f"{row['bare_items_per_s'][path]:>8.2f} | "
            + " ".join(f"{ratios.get(m, float('nan')):>9.3f}" for m in MODES[1:])
            + f" | {fastest:>7.3f} | {'met' if worst <= GOAL else 'NOT met':>7}"
            + f" | {min(cosines.values()):>9.6f}"
            + f" {row['prompted_vs_bare_min_cosine'][path]:>9.6f}",
            flush=True,
        )


HEADER = (
    f"{'tower':<5} {'B':>3} {'path':<15} | {'bare/s':>8} | "
    + " ".join(f"{m:>9}" for m in MODES[1:])
    + f" | {'fastest':>7} | {'goal':>7} | {'min cos':>9} {'task cos':>9}"
)


def main() -> None:
    args = parse_args()
    machine = setup(args.threads)
    base = lpi.load_backbone(args.preset, seed=0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lpi-serving-prompt-") as tmp:
        artifacts = make_artifacts(base, Path(tmp))
        engines, keys = make_engines(base, artifacts, Path(tmp) / "onnx", args)
        print(
            "bare/s: items/s with no task; then prompted time over bare time per mode (goal "
            f"<= {GOAL:.2f}); fastest: the worst mode's ratio of fastest rounds; min cos: worst "
            f"per-row cosine against {args.paths[0]} over the modes; task cos: worst per-row "
            "cosine of one task's vectors against bare ones"
        )
        print(HEADER, flush=True)
        with torch.inference_mode():
            for batch in args.batches:
                for modality in args.modalities:
                    rows.append(bench(engines, keys, modality, batch, args))
                    print_row(rows[-1])
    machine["load_average_at_end"] = os.getloadavg()
    goal = {"target": f"prompted/bare time <= {GOAL:.3f} on every path and mode"}
    worst = max(max(r.values()) for row in rows for r in row["prompted_over_bare"].values())
    goal |= {"worst": worst, "met": worst <= GOAL}
    write_json(args.out, {"machine": machine, "goal": goal, "rows": rows})
    print(f"worst prompted/bare: {worst:.3f} ({'met' if goal['met'] else 'NOT met'})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
