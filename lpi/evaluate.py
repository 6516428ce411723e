"""`python -m lpi.evaluate RUN`: recall, forgetting and routing of a continual run.

A thin command line over `lpi.continual.evaluator.run_evaluation`: the flags fill an
`EvalConfig`. It re-evaluates the run's final state from its checkpoints, takes the matrix
after each task from what `lpi.train` recorded, and writes `RUN/eval.json` and a PNG heatmap
of R@1 per task across the sequence (`RUN/recall.png`). `--key-centres K` asks what routing
with K centres per task would give the same prompts, in `RUN/eval-centres-K.json`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path

from lpi.continual.evaluator import EvalConfig, report_name, run_evaluation
from lpi.continual.flags import DefaultsHelp, default_of
from lpi.continual.run_state import RunError

log = logging.getLogger("lpi.evaluate")


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    """The flags as an `EvalConfig` (argparse exits with status 2 on a bad flag)."""
    parser = argparse.ArgumentParser(
        prog="python -m lpi.evaluate",
        description=__doc__.split("\n")[0],
        formatter_class=DefaultsHelp,
    )
    parser.add_argument("run", type=Path, help="run folder written by python -m lpi.train")
    parser.add_argument("--manifest", type=Path, help="manifest; None means the run's own")
    parser.add_argument("--backbone", help="backbone; None means the run's own")
    parser.add_argument("--device", default=default_of(EvalConfig, "device"), help="torch device")
    parser.add_argument(
        "--key-centres",
        type=int,
        default=None,
        help="refit every task's routing keys with this many centres from the manifest's train "
        "split instead of the run's saved keys, and write only RUN/eval-centres-K.json (eval.json "
        "and recall.png are left as they are); None means the saved keys",
    )
    try:
        return EvalConfig(**vars(parser.parse_args(argv)))
    except ValueError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = parse_args(argv)
    try:
        report = run_evaluation(config)
    except (RunError, ValueError, OSError) as err:
        log.error("%s", err)
        return 2
    final = report["final"]["r1"]
    log.info(
        "final mean R@1 oracle %.2f routed %.2f (%s centres per task), forgetting %s; wrote %s",
        statistics.fmean(final["oracle"].values()),
        statistics.fmean(final["routed"].values()),
        report["key_centres"],
        report["oracle"]["mean_forgetting"],
        config.run / report_name(config),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
