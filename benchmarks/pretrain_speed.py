"""Pretraining step time with the full token embedding table stepped vs only its used rows
(`lpi.continual.compact_vocab`): the same model either way (tests/test_pretrain_cache.py).

Per preset, two trainers start from the same seed; each call is one `train_step` (forward,
backward, AdamW step) on the same fixed batch of real pretraining images and captions. The
calls are timed round-robin (benchkit.time_calls, medians), so drift and other jobs' load hit
both modes alike. Absolute times belong to the machine, threads and load printed with them;
compare the ratio.

    python benchmarks/pretrain_speed.py --manifest data/bench/pretrain.jsonl --presets tiny bench
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from benchkit import table, time_calls, write_json
from floor import machine_info

from lpi.backbone import Backbone
from lpi.config import load_preset
from lpi.continual.compact_vocab import CompactEmbedding, used_tokens
from lpi.continual.data.loader import Batch, make_loader
from lpi.continual.data.manifest import read_manifest, select
from lpi.continual.methods import make_optimizer
from lpi.continual.pretraining import param_groups, train_step


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--manifest", type=Path, required=True, help="pretraining manifest")
    parser.add_argument("--presets", nargs="+", default=["tiny", "bench"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7, help="round-robin rounds")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="per timed sample")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pretrain_speed.json"))
    return parser.parse_args()


def step_fn(preset: str, batch: Batch, used: torch.Tensor | None):
    """One training step of a fresh backbone (seed 0), with the compact table when `used`."""
    torch.manual_seed(0)
    backbone = Backbone(load_preset(preset)).train().requires_grad_(True)
    if used is not None:
        backbone.token_embedding = CompactEmbedding(backbone.token_embedding, used)  # type: ignore[assignment]
    optimizer, _ = make_optimizer(param_groups(backbone), 2e-3, 0.1, 10_000)
    return lambda: train_step(backbone, batch, optimizer)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    records = select(read_manifest(args.manifest), split="train")
    rows = []
    for preset in args.presets:
        config = load_preset(preset)
        loader = make_loader(records[: args.batch_size], config.vision.image_size, args.batch_size)
        batch = next(iter(loader))
        used = used_tokens((c for r in records for c in r.captions), config.text.context_length)
        fns = {"full": step_fn(preset, batch, None), "compact": step_fn(preset, batch, used)}
        seconds = time_calls(fns, args.repeats, args.min_seconds)
        rows.append(
            {
                "preset": preset,
                "vocabulary": config.text.vocab_size,
                "used_rows": len(used),
                "full_ms": 1000 * seconds["full"],
                "compact_ms": 1000 * seconds["compact"],
                "speedup": seconds["full"] / seconds["compact"],
            }
        )
    columns = [
        ("preset", "{}"),
        ("used_rows", "{}"),
        ("full_ms", "{:.0f}"),
        ("compact_ms", "{:.0f}"),
        ("speedup", "{:.2f}"),
    ]
    print(table(columns, rows))
    print(f"{info['cpu']}, {args.threads} thread(s), load at start {info['load_average_at_start']}")
    payload = {"machine": info, "batch_size": args.batch_size, "rows": rows}
    write_json(args.out, payload | {"load_average_at_end": os.getloadavg()})


if __name__ == "__main__":
    main()
