"""The cross-task prompt-swap matrix of a finished run: how task-specific its prompts are.

Cell [i][j] is the oracle R@1 (mean of image->text and text->image, METHOD.md §5) of task i's
test set encoded with task j's final prompts, against task i's own gallery. The diagonal is the
run's oracle recall; the drop off the diagonal is what a misrouted query costs, which is where
the task constraint L_task should show (a routed query lands on another task's prompts). It is
computed exactly as `lpi.continual.evaluation.evaluate_seen` encodes, so the diagonal equals
the final oracle recall of `eval.json` bit for bit. `python -m lpi.continual.swap RUN` writes
RUN/swap.json.

Dimensions: T tasks, I images, C captions.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import torch

from lpi import atomic
from lpi.continual import recall as recall_metrics
from lpi.continual.data.loader import eval_set
from lpi.continual.data.manifest import read_manifest, select
from lpi.continual.evaluation import encode, headline_r1, make_test_set
from lpi.continual.evaluator import final_bank, open_run
from lpi.continual.run_state import RunError
from lpi.continual.trainer import default_device

log = logging.getLogger("lpi.swap")
REPORT = "swap.json"


def swap_summary(matrix: list[list[float]]) -> dict[str, float | None]:
    """Diagonal mean, off-diagonal mean and their gap (positive: prompts are task-specific)."""
    count = len(matrix)
    diagonal = [matrix[i][i] for i in range(count)]
    off = [matrix[i][j] for i in range(count) for j in range(count) if i != j]
    diag_mean = sum(diagonal) / count
    off_mean = sum(off) / len(off) if off else math.nan
    return {
        "diagonal_mean": diag_mean,
        "off_diagonal_mean": None if math.isnan(off_mean) else off_mean,
        "gap": None if math.isnan(off_mean) else diag_mean - off_mean,
    }


def swap_matrix(
    run: Path,
    backbone: str | None = None,
    manifest: Path | None = None,
    device: str | None = None,
    split: str = "test",
) -> dict:
    """The swap matrix [T][T] of `run`'s finished tasks (JSON-safe), computed, not written.

    Raises RunError for a run without finished tasks, without prompts (zero-shot) or trained
    on another backbone.
    """
    run, device = Path(run), device or default_device()
    state, model = open_run(run, backbone, device)
    bank = final_bank(run, state, model, device)
    if bank is None:
        raise RunError(f"{run}: method {state.config.method} has no prompts to swap")
    records = read_manifest(manifest or state.config.manifest)
    size = model.config.vision.image_size
    tasks = list(state.done)
    matrix: list[list[float]] = []
    for data_task in tasks:
        data = make_test_set(*eval_set(select(records, data_task, split), size))
        row = []
        for prompt_task in tasks:
            image = encode(model, bank, data.pixels, [prompt_task] * len(data.pixels), True)
            text = encode(model, bank, data.tokens, [prompt_task] * len(data.tokens), False)
            recall = recall_metrics.retrieval_recall(image, text, data.caption_to_image)
            row.append(headline_r1(recall))
        matrix.append(row)  # row i: task i's data through every task's prompts
    return {
        "method": state.config.method,
        "tasks": tasks,
        "split": split,
        "matrix": matrix,  # [T][T], rows: data task, columns: prompt task
        **swap_summary(matrix),
    }


def write_swap(
    run: Path,
    backbone: str | None = None,
    manifest: Path | None = None,
    device: str | None = None,
    split: str = "test",
) -> dict:
    """Compute the swap matrix of `run` and write RUN/swap.json (atomic); the report."""
    with torch.no_grad():
        report = swap_matrix(run, backbone, manifest, device, split)
    atomic.write_json(Path(run) / REPORT, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lpi.continual.swap",
        description="Cross-task prompt-swap matrix of a finished run (RUN/swap.json).",
    )
    parser.add_argument("run", type=Path, help="run folder written by python -m lpi.train")
    parser.add_argument("--backbone", default=None, help="default: the run's own")
    parser.add_argument("--manifest", type=Path, default=None, help="default: the run's own")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = write_swap(
            args.run, backbone=args.backbone, manifest=args.manifest, device=args.device
        )
    except (RunError, OSError, ValueError) as err:
        log.error("%s", err)
        return 2
    for task, row in zip(report["tasks"], report["matrix"], strict=True):
        log.info("%s: %s", task, " ".join(f"{value:5.1f}" for value in row))
    log.info("wrote %s", args.run / REPORT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
