"""Exporting a continual run's tasks (what `lpi.train` wrote) as task artifacts.

Everything is checked before the first file is written: the run's backbone fingerprint against
the given backbone, and that every requested task is in the run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from export.artifact import (
    ArtifactError,
    BackboneMismatchError,
    TaskArtifact,
    task_id,
    write_artifact,
)
from lpi import Backbone, atomic, fingerprint, fold_task
from lpi.continual.methods import method_spec, new_prompts
from lpi.continual.run_state import RunState, load_keys, load_state, load_task
from lpi.routing import TaskKeys

log = logging.getLogger(__name__)
INDEX = "index.json"


class RunExportError(ArtifactError):
    """The run cannot be exported as asked (missing task, untrained method, no run)."""


def export_run(
    run: Path, backbone: Backbone, out: Path, tasks: list[str] | None = None
) -> list[TaskArtifact]:
    """One artifact per finished task of `run` (or of `tasks`), then the folder's index."""
    state = load_state(run)
    if state is None:
        raise RunExportError(f"{run}: no run.json; export reads the folder lpi.train wrote")
    if not method_spec(state.config.method).trains:
        raise RunExportError(f"{run}: method {state.config.method!r} has no prompts to export")
    backbone_fingerprint = fingerprint(backbone)  # hashing ViT-B's weights takes seconds: once
    if state.config.backbone_fingerprint != backbone_fingerprint:
        raise BackboneMismatchError(
            f"{run}: trained on backbone {state.config.backbone} "
            f"({state.config.backbone_fingerprint[:12]}), not the one given"
        )
    wanted = tasks or state.done
    missing = [t for t in wanted if t not in state.done]
    if missing:
        raise RunExportError(f"{run}: tasks {missing} are not in the run; it has {state.done}")
    keys = load_keys(run)
    out.mkdir(parents=True, exist_ok=True)
    artifacts = []
    for task in tqdm(wanted, desc="export", leave=False, disable=None):
        artifacts.append(_export_task(run, state, task, backbone, keys, out, backbone_fingerprint))
        log.info("exported %s as %s", task, artifacts[-1].path)
    write_index(out, artifacts)
    return artifacts


def _export_task(
    run: Path,
    state: RunState,
    task: str,
    backbone: Backbone,
    keys: TaskKeys | None,
    out: Path,
    backbone_fingerprint: str,
) -> TaskArtifact:
    index = state.done.index(task)
    module = new_prompts(state.config.method, state.config.prompt_config(), backbone)
    meta = load_task(run, index, task, module)
    final = state.results[-1] if state.results else {}
    metrics = {
        "loss": meta.get("loss", []),
        "r1_oracle_final": final.get("r1", {}).get("oracle", {}).get(task),
        "r1_oracle_after_task": state.results[index]["r1"]["oracle"].get(task)
        if index < len(state.results)
        else None,
    }
    task_keys = {}
    if keys is not None and task in keys.names:
        task_keys = {m: keys.centres(task, m) for m in ("image", "text")}
    extra = {
        "method": state.config.method,
        "prompt": state.config.prompt,
        "parameters": module.num_parameters(),
    }
    return write_artifact(
        out / f"{task_id(task)}.safetensors",
        task,
        fold_task(backbone, module),
        backbone,
        train=module.state_dict(),
        keys=task_keys,
        metrics=metrics,
        extra=extra,
        backbone_fingerprint=backbone_fingerprint,
    )


def write_index(out: Path, artifacts: list[TaskArtifact]) -> Path:
    """Merge `artifacts` into the folder's index.json (atomic), one entry per task id."""
    path = out / INDEX
    entries = {}
    if path.exists():
        entries = {e["task_id"]: e for e in json.loads(path.read_text()).get("tasks", [])}
    for artifact in artifacts:
        assert artifact.path is not None  # written artifacts know their file
        entries[artifact.task_id] = {
            "task_id": artifact.task_id,
            "name": artifact.name,
            "file": artifact.path.name,
            "prompt_version": artifact.prompt_version,
            "backbone_fingerprint": artifact.meta["backbone_fingerprint"],
            "bytes": artifact.path.stat().st_size,
            "created": artifact.meta["created"],
        }
    return atomic.write_json(path, {"format": "lpi-task-index", "tasks": list(entries.values())})
