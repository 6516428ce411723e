"""Backbone throughput on this machine: no prompt, one task, 8 tasks mixed, and open_clip.

Random weights (nothing is downloaded). Prefixes are built once before timing, as the server
builds them once per task at load time; the timed call is the forward pass alone. All rows of
one preset and batch size are measured side by side in one run, so their ratios are fair;
absolute numbers belong to the machine named in the output.

    python benchmarks/backbone.py --presets tiny ViT-B-16 --batches 1 8 32
"""

from __future__ import annotations

import argparse
import os
import platform
from functools import partial
from pathlib import Path

import torch
from benchkit import time_calls, write_json

import lpi

CAPTIONS = [
    "a photo of a red car parked on the street",
    "two dogs playing with a ball in the park",
    "a plate of food with vegetables and rice",
    "a man riding a wave on top of a surfboard",
]
MODES = ("none", "one task", "8 tasks mixed")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "ViT-B-16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per cell (median)")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=1.0,
        help="repeat small cells until each timing spans at least this long",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/backbone.json"))
    parser.add_argument("--no-open-clip", action="store_true", help="skip the open_clip rows")
    return parser.parse_args()


def make_prefixes(backbone: lpi.Backbone, batch: int) -> dict[str, tuple]:
    layers = min(9, backbone.config.vision.layers, backbone.config.text.layers)
    bank = lpi.PromptBank()
    for task in range(8):
        torch.manual_seed(100 + task)
        config = lpi.PromptConfig(layers=layers, tokens=16, rank=4)
        bank.add(f"task{task}", lpi.TaskPrompts.for_backbone(config, backbone))
    one = bank.prefixes(backbone, ["task0"] * batch)
    mixed = bank.prefixes(backbone, [f"task{row % 8}" for row in range(batch)])
    return {"none": (None, None), "one task": one, "8 tasks mixed": mixed}


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
    backbone = lpi.load_backbone(name)
    twin = None if args.no_open_clip else open_clip_twin(backbone)
    size = backbone.config.vision.image_size
    rows = []
    for batch in args.batches:
        generator = torch.Generator().manual_seed(batch)
        pixels = torch.randn(batch, 3, size, size, generator=generator)
        tokens = lpi.tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)])
        with torch.inference_mode():
            prefixes = make_prefixes(backbone, batch)
            for modality, data in (("image", pixels), ("text", tokens)):
                encode = backbone.encode_image if modality == "image" else backbone.encode_text
                fns = {
                    mode: partial(encode, data, prefixes[mode][modality == "text"])
                    for mode in MODES
                }
                if twin is not None:
                    twin_encode = twin.encode_image if modality == "image" else twin.encode_text
                    fns["open_clip"] = partial(twin_encode, data)
                cells = time_calls(fns, args.repeats, args.min_seconds)
                rows.append(summarise(name, modality, batch, cells))
                print_row(rows[-1])
    return rows


def summarise(preset: str, modality: str, batch: int, cells: dict[str, float]) -> dict:
    row = {
        "preset": preset,
        "modality": modality,
        "batch": batch,
        "seconds": cells,
        "items_per_s": {k: batch / v for k, v in cells.items()},
    }
    row["prompted_over_unprompted"] = {
        mode: cells[mode] / cells["none"] for mode in MODES if mode != "none"
    }
    if "open_clip" in cells:
        row["ours_over_open_clip"] = {mode: cells[mode] / cells["open_clip"] for mode in MODES}
    return row


HEADER = (
    f"{'preset':<9} {'mod':<5} {'B':>3} | {'none/s':>8} {'1 task/s':>8} {'8 mix/s':>8} "
    f"{'open_clip/s':>11} | {'1task/none':>10} {'8mix/none':>9} | {'none/oc':>7} "
    f"{'8mix/oc':>7}"
)


def print_row(row: dict) -> None:
    ips, ratio = row["items_per_s"], row["prompted_over_unprompted"]
    oc = row.get("ours_over_open_clip", {})
    print(
        f"{row['preset']:<9} {row['modality']:<5} {row['batch']:>3} | {ips['none']:>8.1f} "
        f"{ips['one task']:>8.1f} {ips['8 tasks mixed']:>8.1f} "
        f"{ips.get('open_clip', float('nan')):>11.1f} | {ratio['one task']:>10.3f} "
        f"{ratio['8 tasks mixed']:>9.3f} | {oc.get('none', float('nan')):>7.3f} "
        f"{oc.get('8 tasks mixed', float('nan')):>7.3f}",
        flush=True,
    )


def main() -> None:
    args = parse_args()
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(f"machine: {machine}")
    print(
        "time ratios (<1 is faster): 1task/none, 8mix/none = prompted over unprompted; "
        "x/oc = ours over open_clip on the same weights and batch"
    )
    print(HEADER)
    rows = [row for name in args.presets for row in bench_preset(name, args)]
    write_json(args.out, {"machine": machine, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
