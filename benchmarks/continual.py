"""The synthetic continual benchmark: every method of METHOD.md §5 on the same data and backbone.

One command makes the README's table: it generates the synthetic captioned images (if absent),
pretrains a small CLIP (`--preset`) on the pretraining split (if absent), trains and evaluates
each method task after task, and prints a table of final mean recall@1 and forgetting; JSON
goes next to it. On a shared 2-core machine set OMP_NUM_THREADS=1.

    python benchmarks/continual.py --out runs/synthetic
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchkit import write_json

from lpi import atomic, evaluate, pretrain, train
from lpi.continual.data import synthetic

METHODS = [
    "zero-shot",
    "shared",
    "dense",
    "lpi",
    "lpi-no-interaction",
    "lpi-no-layer",
    "lpi-no-task",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/synthetic"))
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument(
        "--ranks",
        nargs="*",
        type=int,
        default=[1, 2, 8],
        help="extra LPI runs at these ranks (the rank sweep; R=4 is 'lpi'); pass --ranks with "
        "no value to skip it",
    )
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--train-per-task", type=int, default=1000)
    parser.add_argument("--test-per-task", type=int, default=200)
    parser.add_argument("--pretrain-images", type=int, default=4000)
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument(
        "--preset", default="small", help="backbone architecture to pretrain (lpi/presets)"
    )
    parser.add_argument("--epochs", type=int, default=30, help="epochs per task")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    data, backbone = args.out / "data", args.out / "backbone.safetensors"
    if not (data / "manifest.jsonl").exists():
        synthetic.main(
            [
                "--out",
                str(data),
                "--tasks",
                str(args.tasks),
                "--train-per-task",
                str(args.train_per_task),
                "--test-per-task",
                str(args.test_per_task),
                "--pretrain",
                str(args.pretrain_images),
                "--seed",
                str(args.seed),
            ]
        )
    if not backbone.exists():
        code = pretrain.main(
            [
                "--manifest",
                str(data / "pretrain.jsonl"),
                "--out",
                str(backbone),
                "--epochs",
                str(args.pretrain_epochs),
                "--preset",
                args.preset,
                "--seed",
                str(args.seed),
            ]
        )
        if code:
            raise SystemExit(code)
    return data / "manifest.jsonl", backbone


def run_method(args, name: str, method: str, rank: int, manifest: Path, backbone: Path) -> dict:
    folder = args.out / "runs" / name
    start = time.perf_counter()
    code = train.main(
        [
            "--manifest",
            str(manifest),
            "--backbone",
            str(backbone),
            "--out",
            str(folder),
            "--method",
            method,
            "--layers",
            str(args.layers),
            "--tokens",
            str(args.tokens),
            "--rank",
            str(rank),
            "--epochs",
            str(args.epochs),
            "--lr",
            str(args.lr),
            "--seed",
            str(args.seed),
            "--cache",
        ]
    )
    if code or evaluate.main([str(folder)]):
        raise SystemExit(f"{name} failed")
    report = json.loads((folder / "eval.json").read_text())
    return {
        "name": name,
        "parameters_per_task": report["parameters_per_task"],
        "final_r1_oracle": report["oracle"]["final_mean"],
        "forgetting_oracle": report["oracle"]["mean_forgetting"],
        "final_r1_routed": report["routed"]["final_mean"],
        "forgetting_routed": report["routed"]["mean_forgetting"],
        "routing_accuracy": report["routing_accuracy_final"],
        "seconds": time.perf_counter() - start,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| method | params/task | final R@1 oracle | forgetting oracle | final R@1 routed "
        "| forgetting routed | routing acc. img/txt | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        forget = [
            ("-" if v is None else f"{v:.2f}")
            for v in (r["forgetting_oracle"], r["forgetting_routed"])
        ]
        lines.append(
            f"| {r['name']} | {r['parameters_per_task']:,} | {r['final_r1_oracle']:.2f} "
            f"| {forget[0]} | {r['final_r1_routed']:.2f} | {forget[1]} "
            f"| {_accuracy(r['routing_accuracy'])} "
            f"| {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def _accuracy(accuracy: dict | None) -> str:
    return "-" if accuracy is None else f"{accuracy['image']:.0f}/{accuracy['text']:.0f}"


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    manifest, backbone = prepare(args)
    runs = [(m, m, 4) for m in args.methods] + [(f"lpi-rank{r}", "lpi", r) for r in args.ranks]
    rows = [run_method(args, name, method, rank, manifest, backbone) for name, method, rank in runs]
    text = table(rows)
    print(text)
    print(f"total {time.perf_counter() - start:.0f} s")
    write_json(
        args.out / "results.json", {"args": vars(args) | {"out": str(args.out)}, "rows": rows}
    )
    atomic.write_text(args.out / "results.md", text + "\n")


if __name__ == "__main__":
    main()
