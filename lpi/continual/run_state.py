"""A continual run on disk: its metadata, one checkpoint per finished task, and the task keys.

    RUN/run.json                  config, backbone fingerprint, tasks, seed, progress, results
    RUN/task-000-<name>.safetensors   the trainable parameters after that task (+ metadata)
    RUN/keys.safetensors          task keys (K-Means centres) for routing

Every file is written atomically (temporary file, then rename), and a task's checkpoint before
run.json records it done, so a crash loses at most the task in progress.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lpi import atomic
from lpi.config import PromptConfig
from lpi.continual.losses import TASK_THRESHOLD
from lpi.routing import CLUSTERS, TaskKeys

# 2: L_task's rule (task_threshold, similarity, similarity_from_descriptions) is recorded. A
# format-1 run.json has none of it: resuming one would train on under a rule it never named.
RUN_FORMAT = 2


class RunError(ValueError):
    """A run folder that cannot be resumed as asked; the message says why."""


@dataclass
class RunConfig:
    """What a run was started with; a resume must match it."""

    method: str
    manifest: str
    backbone: str
    backbone_fingerprint: str
    tasks: list[str]
    prompt: dict
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    format: int = RUN_FORMAT
    task_threshold: float = TASK_THRESHOLD  # L_task's Y = S > threshold
    eval_split: str = "test"  # the split each evaluation read ("val" in a learning-rate sweep)
    lr_source: str | None = None  # the sweep file lr came from, if any
    similarity: dict | None = None  # L_task's S: source, tasks, matrix used, threshold
    similarity_from_descriptions: bool = False  # S asked of the text tower (no file given)
    key_centres: int = CLUSTERS  # K-Means centres per task and modality (runs before it: 5)

    def prompt_config(self) -> PromptConfig:
        return PromptConfig(**self.prompt)


@dataclass
class RunState:
    config: RunConfig
    done: list[str] = field(default_factory=list)  # tasks finished, in training order
    results: list[dict] = field(default_factory=list)  # one evaluation after each task
    parameters_per_task: int = 0


def json_safe(value: Any) -> Any:
    """JSON has no NaN: replace it with None, recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def save_state(folder: Path, state: RunState) -> None:
    data = {
        "config": asdict(state.config),
        "done": state.done,
        "results": state.results,
        "parameters_per_task": state.parameters_per_task,
    }
    atomic.write_json(folder / "run.json", data)


def load_state(folder: Path) -> RunState | None:
    path = folder / "run.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        config = RunConfig(**data["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise RunError(f"{path}: not a readable run file ({err})") from err
    if config.format != RUN_FORMAT:
        raise RunError(
            f"{path}: run format {config.format}, this version reads {RUN_FORMAT} (format 1 did"
            " not record L_task's similarity or threshold): train into a new run folder"
        )
    return RunState(
        config, data.get("done", []), data.get("results", []), data.get("parameters_per_task", 0)
    )


def task_file(folder: Path, index: int, task: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", task)
    return folder / f"task-{index:03d}-{safe}.safetensors"


def save_task(folder: Path, index: int, task: str, module: torch.nn.Module, meta: dict) -> Path:
    """The trainable parameters of one task, with JSON metadata in the safetensors header."""
    path = task_file(folder, index, task)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    metadata = {"task": task, "index": str(index), "meta": json.dumps(meta)}
    with atomic.atomic_path(path) as temp:
        save_file(tensors, str(temp), metadata=metadata)
    return path


def load_task(folder: Path, index: int, task: str, module: torch.nn.Module) -> dict:
    """Fill `module` from a task checkpoint (strict) and return its metadata."""
    path = task_file(folder, index, task)
    if not path.exists():
        raise RunError(f"{path} is missing: run.json says task {task!r} is done")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    module.load_state_dict(load_file(str(path)), strict=True)
    meta: dict = json.loads(metadata.get("meta", "{}"))
    return meta


def save_keys(folder: Path, keys: TaskKeys) -> None:
    path = folder / "keys.safetensors"
    with atomic.atomic_path(path) as temp:
        save_file(keys.state_dict(), str(temp), metadata={"tasks": json.dumps(list(keys.names))})


def load_keys(folder: Path, clusters: int = CLUSTERS) -> TaskKeys | None:
    """The saved keys, fitting later tasks' with `clusters` centres (the run's own count)."""
    path = folder / "keys.safetensors"
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as handle:
        names = json.loads((handle.metadata() or {}).get("tasks", "[]"))
    return TaskKeys.from_state_dict(load_file(str(path)), names, clusters)
