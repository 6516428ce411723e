"""`python -m lpi.evaluate RUN`: recall, forgetting and routing of a continual run.

Re-evaluates the run's final state from its checkpoints (every task, oracle and routed task,
per-task and union gallery, recall@1/5/10 both ways), takes the matrix after each task from
what `lpi.train` recorded as it went, and writes `RUN/eval.json` and a PNG heatmap of R@1 per
task across the sequence.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from lpi import atomic
from lpi.checkpoint import fingerprint, load_backbone
from lpi.continual.data.loader import eval_set
from lpi.continual.data.manifest import read_manifest, select
from lpi.continual.evaluation import evaluate_seen, make_test_set, summarise
from lpi.continual.heatmap import draw_heatmap
from lpi.continual.methods import method_spec, new_prompts
from lpi.continual.run_state import RunError, json_safe, load_keys, load_state, load_task
from lpi.prompts import PromptBank

log = logging.getLogger("lpi.evaluate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lpi.evaluate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run", type=Path, help="run folder written by python -m lpi.train")
    parser.add_argument("--manifest", type=Path, help="manifest (default: the run's own)")
    parser.add_argument("--backbone", help="backbone (default: the run's own)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def final_bank(run: Path, state, backbone, device) -> PromptBank | None:
    """Every finished task's prompts as the run left them (None for zero-shot)."""
    config = state.config
    spec = method_spec(config.method)
    if not spec.trains:
        return None
    bank = PromptBank()
    last = None
    if spec.shared:  # one module: its state after the last task serves every task
        last = new_prompts(config.method, config.prompt_config(), backbone).to(device)
        load_task(run, len(state.done) - 1, state.done[-1], last)
    for index, task in enumerate(state.done):
        module = last or new_prompts(config.method, config.prompt_config(), backbone).to(device)
        if last is None:
            load_task(run, index, task, module)
        bank.add(task, module)
    return bank


def evaluate_run(run: Path, manifest: Path | None, backbone_path: str | None, device) -> dict:
    state = load_state(run)
    if state is None or not state.done:
        raise RunError(f"{run}: no finished task to evaluate (run python -m lpi.train first)")
    backbone = load_backbone(backbone_path or state.config.backbone, device=device)
    if fingerprint(backbone) != state.config.backbone_fingerprint:
        raise RunError(f"{run}: the backbone differs from the one the run was trained on")
    records = read_manifest(manifest or state.config.manifest)
    size = backbone.config.vision.image_size
    tests = {t: make_test_set(*eval_set(select(records, t, "test"), size)) for t in state.done}
    final = evaluate_seen(backbone, final_bank(run, state, backbone, device), load_keys(run), tests)
    return {
        "method": state.config.method,
        "tasks": state.done,
        "parameters_per_task": state.parameters_per_task,
        "final": final,
        "oracle": summarise(state.results, "oracle"),
        "routed": summarise(state.results, "routed"),
        "routing_accuracy_final": final["routing_accuracy"],
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = parse_args(argv)
    try:
        report = json_safe(evaluate_run(args.run, args.manifest, args.backbone, args.device))
    except (RunError, ValueError, OSError) as err:
        log.error("%s", err)
        return 2
    atomic.write_json(args.run / "eval.json", report)
    title = f"{report['method']}: R@1 (mean of both directions), oracle task"
    draw_heatmap(report["oracle"]["matrix"], report["tasks"], title, args.run / "recall.png")
    log.info(
        "final mean R@1 oracle %.2f routed %.2f, forgetting %s; wrote %s",
        report["oracle"]["final_mean"],
        report["routed"]["final_mean"],
        report["oracle"]["mean_forgetting"],
        args.run / "eval.json",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
