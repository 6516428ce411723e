"""`python -m lpi.train`: learn task prompts one task after another on a frozen backbone.

A thin command line over `lpi.continual.trainer.run_training`: the flags fill a `TrainConfig`.
After each task it saves the task's parameters, its keys and an evaluation of every task seen
so far; rerunning the same command resumes after the last finished task, and `--tasks` with
one more name adds a task onto a finished run. Spec sections 4 and 5.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from lpi.continual.evaluation import summarise
from lpi.continual.flags import DefaultsHelp, add_optimiser_flags, default_of
from lpi.continual.methods import METHODS
from lpi.continual.run_state import RunError, json_safe
from lpi.continual.sweep import SweepError, chosen
from lpi.continual.trainer import TrainConfig, run_training

log = logging.getLogger("lpi.train")


def add_train_flags(parser: argparse.ArgumentParser, sweep: bool = False) -> None:
    """Every TrainConfig flag; `sweep` leaves out those a sweep sets itself (method, lr, out)."""

    def default(name: str) -> Any:
        return default_of(TrainConfig, name)

    parser.add_argument("--manifest", type=Path, required=True, help="JSONL task-split manifest")
    parser.add_argument("--backbone", required=True, help="checkpoint path or preset name")
    if not sweep:
        parser.add_argument("--out", type=Path, required=True, help="run folder (created/resumed)")
        parser.add_argument(
            "--method",
            default=default("method"),
            choices=list(METHODS),
            help="what is trained (below)",
        )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        help="task order; None means the manifest order of tasks with train records",
    )
    parser.add_argument(
        "--layers", type=int, default=default("layers"), help="J prompted layers (capped at depth)"
    )
    parser.add_argument(
        "--tokens", type=int, default=default("tokens"), help="N prompt tokens per modality"
    )
    parser.add_argument(
        "--rank", type=int, default=default("rank"), help="R, rank of the CP factors"
    )
    parser.add_argument(
        "--interaction-rank", type=int, default=default("interaction_rank"), help="R_i"
    )
    add_optimiser_flags(parser, TrainConfig, epochs="epochs per task", lr=not sweep)
    if not sweep:
        parser.add_argument(
            "--init-std", type=float, default=default("init_std"), help="std of factors' init"
        )
    parser.add_argument(
        "--similarity",
        type=Path,
        default=default("similarity"),
        help="task similarity JSON for L_task; None means task_similarity.json beside the "
        "manifest if present, else L_task is off",
    )
    parser.add_argument(
        "--similarity-from-descriptions",
        action="store_true",
        help="without a similarity file, take S from the frozen text tower's features of the "
        "task names (meaningful only for a real pretrained CLIP)",
    )
    parser.add_argument(
        "--task-threshold",
        type=float,
        default=default("task_threshold"),
        help="L_task targets Y = S > threshold (diagonal positive)",
    )
    parser.add_argument(
        "--key-centres",
        type=int,
        default=default("key_centres"),
        help="routing keys: K-Means centres per task and modality (the paper's 5; "
        "benchmarks/backbone_quality.py measures routing at several counts)",
    )
    parser.add_argument("--cache", action="store_true", help="hold decoded pixels in memory")
    parser.add_argument("--seed", type=int, default=default("seed"), help="of data order and init")
    parser.add_argument("--device", default=default("device"), help="torch device")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The flags as a `TrainConfig` (argparse exits with status 2 on a bad flag)."""
    parser = argparse.ArgumentParser(
        prog="python -m lpi.train",
        description=__doc__.split("\n")[0],
        epilog="methods: " + "; ".join(f"{k}: {v}" for k, v in METHODS.items()),
        formatter_class=DefaultsHelp,
    )
    add_train_flags(parser)
    parser.add_argument(
        "--lr-from",
        type=Path,
        default=None,
        help="a sweep.json of python -m lpi.sweep: take the method's chosen lr (and init std) "
        "from it instead of --lr, and record it in run.json",
    )
    args = parser.parse_args(argv)
    fields = {**vars(args), "tasks": tuple(args.tasks) if args.tasks else None}
    lr_from = fields.pop("lr_from")
    if lr_from is not None:
        try:
            point = chosen(lr_from, args.method)
        except SweepError as error:
            parser.error(f"--lr-from: {error}")
        fields["lr"] = float(point["lr"])
        if point.get("init_std") is not None:
            fields["init_std"] = float(point["init_std"])
        fields["lr_source"] = f"{lr_from} (val R@1 {point.get('score')})"
    try:
        return TrainConfig(**fields)
    except ValueError as error:  # a value the flags' types let through (--key-centres 0)
        parser.error(str(error))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = parse_args(argv)
    try:
        state = run_training(config)
    except (RunError, ValueError, OSError) as err:
        log.error("%s", err)
        return 2
    summary = json_safe(summarise(state.results))
    log.info(
        "final mean R@1 %.2f, forgetting %s", summary["final_mean"], summary["mean_forgetting"]
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
