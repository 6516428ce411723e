"""Backbone throughput per dtype: bare, prompted (training's materialised prefix and the
server's slot path), and open_clip on the same weights.

Random weights (nothing is downloaded), or any checkpoint path (the demo's trained backbone).
Tasks are built and folded before timing, as the server does at load time; the timed call is
the forward pass alone. Every cell of one preset, batch and modality is timed round-robin in
one run, and every ratio (dtype over dtype, prompted over bare) is the median over rounds of
the two cells' times in the same round (`benchkit.paired_ratio`): other jobs take the cores in
bursts, which moved a ratio of medians by up to 20 % here. Absolute numbers belong to the
machine, threads and load printed with them, beside the core's matmul floor
(benchmarks/floor.py). Each half-precision
row also reports its worst per-row cosine against float32 (bare and prompted rows).

    python benchmarks/backbone.py --presets tiny ViT-B-32 ViT-B-16 --batches 1 8 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from benchkit import paired_ratio, time_rounds, write_json
from floor import setup

import lpi
from kernels import TaskSlotPool
from lpi.precision import DTYPES, cast_backbone

CAPTIONS = [
    "a photo of a red car parked on the street",
    "two dogs playing with a ball in the park",
    "a plate of food with vegetables and rice",
    "a man riding a wave on top of a surfboard",
]
MODES = ("none", "one task", "8 tasks mixed", "slot one task", "slot 8 mixed")
TASKS, TOKENS, RANK = 8, 16, 4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--presets",
        nargs="+",
        default=["tiny", "ViT-B-32", "ViT-B-16"],
        help="presets or checkpoints (default: %(default)s)",
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="default: 1 8")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=DTYPES,
        help="weight dtypes to time (default: float32 bfloat16)",
    )
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per cell (median)")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=0.5,
        help="repeat a cell until one timing spans this long",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/backbone.json"))
    parser.add_argument("--no-open-clip", action="store_true", help="skip the open_clip cells")
    return parser.parse_args()


def make_tasks(backbone: lpi.Backbone) -> tuple[lpi.PromptBank, list]:
    """Eight random LPI tasks and their folded factors (what the server loads)."""
    layers = min(9, backbone.config.vision.layers, backbone.config.text.layers)
    bank, folded = lpi.PromptBank(), []
    for task in range(TASKS):
        torch.manual_seed(100 + task)
        prompts = lpi.TaskPrompts.for_backbone(
            lpi.PromptConfig(layers=layers, tokens=TOKENS, rank=RANK), backbone
        )
        bank.add(f"task{task}", prompts)
        folded.append(lpi.fold_task(backbone, prompts))
    return bank, folded


def make_pools(folded: list, widths: dict, dtype: torch.dtype) -> dict[str, TaskSlotPool]:
    pools = {}
    for tower in ("image", "text"):
        towers = [getattr(task, tower) for task in folded]
        layers, tokens, _ = towers[0].key_u.shape
        rank = max(t.rank for t in towers)
        pools[tower] = TaskSlotPool(layers, TASKS, tokens, rank, widths[tower], dtype=dtype)
        for index, t in enumerate(towers):
            pools[tower].add(
                f"task{index}", *(x.to(dtype) for x in (t.key_u, t.key_m, t.value_u, t.value_m))
            )
    return pools


def cast_prefix(prefix: lpi.Prefix, dtype: torch.dtype) -> lpi.Prefix:
    return lpi.Prefix(prefix.keys.to(dtype), prefix.values.to(dtype), prefix.active)


def open_clip_twin(backbone: lpi.Backbone):
    """open_clip's CLIP with the very same weights, or None when open_clip is missing."""
    try:
        import open_clip
    except ImportError:
        return None
    cfg = backbone.config
    model = open_clip.model.CLIP(
        embed_dim=cfg.embed_dim,
        vision_cfg=open_clip.model.CLIPVisionCfg(
            layers=cfg.vision.layers,
            width=cfg.vision.width,
            head_width=cfg.vision.width // cfg.vision.heads,
            patch_size=cfg.vision.patch_size,
            image_size=cfg.vision.image_size,
        ),
        text_cfg=open_clip.model.CLIPTextCfg(
            context_length=cfg.text.context_length,
            vocab_size=cfg.text.vocab_size,
            width=cfg.text.width,
            heads=cfg.text.heads,
            layers=cfg.text.layers,
        ),
        quick_gelu=cfg.activation == "quick_gelu",
    )
    model.load_state_dict(backbone.state_dict(), strict=True)
    return model.eval()


def bench_preset(name: str, args: argparse.Namespace) -> list[dict]:
    base = lpi.load_backbone(name)
    bank, folded = make_tasks(base)
    widths = {"image": base.config.vision.width, "text": base.config.text.width}
    models = {dtype: cast_backbone(copy.deepcopy(base), DTYPES[dtype]) for dtype in args.dtypes}
    pools = {dtype: make_pools(folded, widths, DTYPES[dtype]) for dtype in args.dtypes}
    twin = None if args.no_open_clip else open_clip_twin(base)
    size, rows = base.config.vision.image_size, []
    for batch in args.batches:
        generator = torch.Generator().manual_seed(batch)
        pixels = torch.randn(batch, 3, size, size, generator=generator)
        tokens = lpi.tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)])
        one = bank.prefixes(base, ["task0"] * batch)
        mixed = bank.prefixes(base, [f"task{row % TASKS}" for row in range(batch)])
        keys = {
            "slot one task": ["task0"] * batch,
            "slot 8 mixed": [f"task{row % TASKS}" for row in range(batch)],
        }
        for modality, data in (("image", pixels), ("text", tokens)):
            text = modality == "text"
            fns, outputs = {}, {}
            for dtype, model in models.items():
                encode = model.encode_image if not text else model.encode_text
                pool = pools[dtype][modality]
                leases = {mode: pool.lease(k) for mode, k in keys.items()}
                slots = {mode: lease.__enter__() for mode, lease in leases.items()}
                prefixes = {
                    "none": None,
                    "one task": cast_prefix(one[text], DTYPES[dtype]),
                    "8 tasks mixed": cast_prefix(mixed[text], DTYPES[dtype]),
                    **{mode: lpi.SlotPrefix(slots[mode], pool) for mode in keys},
                }
                for mode in MODES:
                    fns[f"{dtype} {mode}"] = partial(encode, data, prefixes[mode])
            if twin is not None:
                fns["open_clip"] = partial(
                    twin.encode_image if not text else twin.encode_text, data
                )
            with torch.inference_mode():
                outputs = {cell: fn() for cell, fn in fns.items()}
                samples = time_rounds(fns, args.repeats, args.min_seconds)
            rows.append(summarise(name, modality, batch, samples, outputs, args.dtypes))
            print_row(rows[-1])
    return rows


def summarise(preset, modality, batch, samples, outputs, dtypes) -> dict:
    seconds = {cell: statistics.median(times) for cell, times in samples.items()}
    row = {
        "preset": preset,
        "modality": modality,
        "batch": batch,
        "seconds": seconds,
        "items_per_s": {k: batch / v for k, v in seconds.items()},
    }
    base = dtypes[0]
    row["speedup_over_" + base] = {
        dtype: paired_ratio(samples[f"{base} none"], samples[f"{dtype} none"]) for dtype in dtypes
    }
    row["prompted_over_bare"] = {  # time ratio, paired by round: 1 = a task costs nothing
        f"{dtype} {mode}": paired_ratio(samples[f"{dtype} {mode}"], samples[f"{dtype} none"])
        for dtype in dtypes
        for mode in MODES[1:]
    }
    row["prompted_over_bare_of_medians"] = {  # unpaired, for comparison: noisier under load
        f"{dtype} {mode}": seconds[f"{dtype} {mode}"] / seconds[f"{dtype} none"]
        for dtype in dtypes
        for mode in MODES[1:]
    }
    row["min_cosine_vs_" + base] = {
        f"{dtype} {mode}": float(
            F.cosine_similarity(outputs[f"{dtype} {mode}"], outputs[f"{base} {mode}"]).min()
        )
        for dtype in dtypes[1:]
        for mode in MODES
    }
    if "open_clip" in seconds:
        row["ours_over_open_clip"] = {
            dtype: paired_ratio(samples[f"{dtype} none"], samples["open_clip"]) for dtype in dtypes
        }
    return row


def print_row(row: dict) -> None:
    ips, ratio = row["items_per_s"], row["prompted_over_bare"]
    speed = next(v for k, v in row.items() if k.startswith("speedup_over_"))
    cosine = next(v for k, v in row.items() if k.startswith("min_cosine_vs_"))
    for dtype, up in speed.items():
        worst = min((v for k, v in cosine.items() if k.startswith(dtype)), default=1.0)
        oc = row.get("ours_over_open_clip", {}).get(dtype, float("nan"))
        print(
            f"{row['preset']:<9} {row['modality']:<5} {row['batch']:>3} {dtype:<8} | "
            f"{ips[f'{dtype} none']:>8.2f} {up:>6.2f}x {worst:>9.6f} | "
            + " ".join(f"{ratio[f'{dtype} {m}']:>6.3f}" for m in MODES[1:])
            + f" | {oc:>6.3f}",
            flush=True,
        )


HEADER = (
    f"{'preset':<9} {'mod':<5} {'B':>3} {'dtype':<8} | {'bare/s':>8} {'speed':>7} {'min cos':>9}"
    f" | {'1task':>6} {'8mix':>6} {'slot1':>6} {'slot8':>6} | {'/oc':>6}"
)


def main() -> None:
    args = parse_args()
    machine = setup(args.threads)
    print(
        "bare/s: items/s with no task; speed: over the first dtype's bare time; min cos: worst "
        "per-row cosine against the first dtype (bare and prompted); 1task..slot8: prompted "
        "time over bare time (1 = free; slot = the server's path); /oc: bare time over "
        "open_clip float32's"
    )
    print(HEADER)
    rows = [row for name in args.presets for row in bench_preset(name, args)]
    machine["load_average_at_end"] = os.getloadavg()
    write_json(args.out, {"machine": machine, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
