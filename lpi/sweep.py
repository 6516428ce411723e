"""`python -m lpi.sweep`: choose each method's learning rate on the validation split.

Trains every (method, lr[, init std]) on the train split, scores it on the val split only (mean
oracle R@1 over the tasks after the last one, both directions; ties go to the smaller lr) and
writes OUT/sweep.json, which `python -m lpi.train --lr-from OUT/sweep.json` reads. Rerunning
the same command resumes: finished points are kept. METHOD.md §4, optimisation note.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lpi.continual.flags import DefaultsHelp
from lpi.continual.methods import METHODS
from lpi.continual.run_state import RunError
from lpi.continual.sweep import run_sweep
from lpi.continual.trainer import TrainConfig
from lpi.train import add_train_flags

log = logging.getLogger("lpi.sweep")

DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lpi.sweep",
        description=__doc__.split("\n")[0],
        epilog="methods: " + "; ".join(f"{k}: {v}" for k, v in METHODS.items()),
        formatter_class=DefaultsHelp,
    )
    parser.add_argument("--out", type=Path, required=True, help="sweep folder (created/resumed)")
    parser.add_argument(
        "--methods", nargs="+", default=["lpi", "dense"], choices=list(METHODS), help="methods"
    )
    parser.add_argument(
        "--lrs", nargs="+", type=float, default=list(DEFAULT_LRS), help="learning rates to try"
    )
    parser.add_argument(
        "--init-stds",
        nargs="+",
        type=float,
        default=None,
        help="also sweep the factors' init std (None: keep the default std)",
    )
    add_train_flags(parser, sweep=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = parse_args(argv)
    fields = vars(args)
    methods, lrs, stds = fields.pop("methods"), fields.pop("lrs"), fields.pop("init_stds")
    fields["tasks"] = tuple(args.tasks) if args.tasks else None
    try:
        sweep = run_sweep(TrainConfig(**fields), methods, lrs, stds)
    except (RunError, ValueError, OSError) as err:
        log.error("%s", err)
        return 2
    for method in methods:
        log.info("%s: lr %g (val R@1 %.2f)", method, sweep[method]["lr"], sweep[method]["score"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
