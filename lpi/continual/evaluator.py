"""Recall, forgetting and routing of a continual run: `run_evaluation(config)`.

Re-evaluates the run's final state from its checkpoints (every task, oracle and routed task,
per-task and union gallery, recall@1/5/10 both ways), takes the matrix after each task from
what training recorded as it went, and writes `RUN/eval.json` and a PNG heatmap of R@1 per
task across the sequence (`RUN/recall.png`). With `key_centres` K it routes the final state by
keys refit at K centres instead, into `RUN/eval-centres-K.json` alone. `python -m
lpi.evaluate` is its CLI.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from lpi import atomic
from lpi.backbone import Backbone
from lpi.checkpoint import fingerprint, load_backbone
from lpi.continual.data.loader import eval_set
from lpi.continual.data.manifest import read_manifest, select
from lpi.continual.evaluation import (
    evaluate_seen,
    fit_keys,
    key_features,
    make_test_set,
    summarise,
)
from lpi.continual.heatmap import draw_heatmap
from lpi.continual.methods import method_spec, new_prompts
from lpi.continual.run_state import (
    RunError,
    RunState,
    json_safe,
    load_keys,
    load_state,
    load_task,
)
from lpi.continual.trainer import default_device
from lpi.prompts import PromptBank
from lpi.routing import check_clusters

log = logging.getLogger("lpi.evaluate")
REPORT = "eval.json"
HEATMAP = "recall.png"


@dataclass(frozen=True)
class EvalConfig:
    """Which run to evaluate, on what data and backbone (default: the run's own)."""

    run: Path  # run folder written by training
    manifest: Path | None = None
    backbone: str | None = None
    device: str = dataclasses.field(default_factory=default_device)
    # None: route by the keys the run saved; K: refit every task's keys with K centres from the
    # manifest's training data (routing at another count without retraining; its own report)
    key_centres: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "run", Path(self.run))
        if self.key_centres is not None:
            check_clusters(self.key_centres)
        if self.manifest is not None:
            object.__setattr__(self, "manifest", Path(self.manifest))


def final_bank(
    run: Path, state: RunState, backbone: Backbone, device: torch.device | str
) -> PromptBank | None:
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


def open_run(
    run: Path, backbone: str | None, device: torch.device | str, doing: str = ""
) -> tuple[RunState, Backbone]:
    """A finished run's state and its backbone (`backbone`, default the run's own); RunError
    for a run with no finished task (the message says what it was for: `doing`) or whose
    backbone is not the one it trained on."""
    state = load_state(run)
    if state is None or not state.done:
        raise RunError(f"{run}: no finished task{doing} (run python -m lpi.train first)")
    model = load_backbone(backbone or state.config.backbone, device=device)
    if fingerprint(model) != state.config.backbone_fingerprint:
        raise RunError(f"{run}: the backbone differs from the one the run was trained on")
    return state, model


def evaluate_run(config: EvalConfig) -> dict:
    """The report of `config.run` (JSON-safe), computed, not written."""
    run, device = config.run, config.device
    state, backbone = open_run(run, config.backbone, device, " to evaluate")
    records = read_manifest(config.manifest or state.config.manifest)
    size = backbone.config.vision.image_size
    tests = {t: make_test_set(*eval_set(select(records, t, "test"), size)) for t in state.done}
    keys_saved, centres = config.key_centres is None, config.key_centres
    if centres is None:
        keys = load_keys(run)
    else:
        train = {t: key_features(backbone, select(records, t, "train")) for t in state.done}
        keys = fit_keys(train, centres)
    final = evaluate_seen(backbone, final_bank(run, state, backbone, device), keys, tests)
    report: dict = json_safe(
        {
            "method": state.config.method,
            "tasks": state.done,
            "parameters_per_task": state.parameters_per_task,
            "final": final,
            "oracle": summarise(state.results, "oracle"),
            # recorded after each task with the saved keys: not what refit keys would give
            "routed": summarise(state.results, "routed") if keys_saved else None,
            "routing_accuracy_final": final["routing_accuracy"],
            "key_centres": state.config.key_centres if keys_saved else config.key_centres,
            "keys": "saved by the run" if keys_saved else "refit from the manifest's train split",
        }
    )
    return report


def report_name(config: EvalConfig) -> str:
    """eval.json for the run's own keys; eval-centres-K.json for keys refit with K centres, so
    a what-if never overwrites the report the benchmark reads."""
    return REPORT if config.key_centres is None else f"eval-centres-{config.key_centres}.json"


def run_evaluation(config: EvalConfig) -> dict:
    """Evaluate `config.run`, write its report (atomic, `report_name`) and recall.png.

    Raises RunError for a run with no finished task or another backbone, ValueError or OSError
    for bad data.
    """
    report = evaluate_run(config)
    atomic.write_json(config.run / report_name(config), report)
    if config.key_centres is not None:
        return report  # the heatmap plots the oracle matrix, which keys do not touch
    title = f"{report['method']}: R@1 (mean of both directions), oracle task"
    draw_heatmap(report["oracle"]["matrix"], report["tasks"], title, config.run / HEATMAP)
    return report
