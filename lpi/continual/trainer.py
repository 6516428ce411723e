"""Learning task prompts one task after another on a frozen backbone: `run_training(config)`.

After each task: a checkpoint of its trainable parameters and the run metadata (atomic), its
task keys (K-Means of frozen features of its training data), and an evaluation of every task
seen so far. Running the same config again resumes after the last finished task; `tasks` with
one more name adds a task onto a finished run. A run stopped through its `Control` (or killed)
loses only the task in progress. Spec sections 4 and 5. `python -m lpi.train` is its CLI.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from lpi.backbone import Backbone
from lpi.checkpoint import fingerprint, load_backbone
from lpi.config import PromptConfig
from lpi.continual import losses
from lpi.continual.control import NO_CONTROL, Control
from lpi.continual.data.loader import eval_set, make_loader
from lpi.continual.data.manifest import Record, read_manifest, select
from lpi.continual.data.manifest import tasks as tasks_in_order
from lpi.continual.evaluation import evaluate_seen, make_test_set
from lpi.continual.methods import (
    METHODS,
    MethodSpec,
    describe_tasks,
    make_optimizer,
    method_spec,
    new_prompts,
    step_loss,
)
from lpi.continual.run_state import (
    RunConfig,
    RunError,
    RunState,
    json_safe,
    load_keys,
    load_state,
    load_task,
    save_keys,
    save_state,
    save_task,
)
from lpi.prompts import PromptBank
from lpi.routing import TaskKeys

log = logging.getLogger("lpi.train")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class TrainConfig:
    """One continual run: data, backbone, method, prompt shape and the optimisation recipe."""

    manifest: Path  # JSONL task-split manifest
    backbone: str  # checkpoint path or preset name
    out: Path  # run folder (created or resumed)
    method: str = "lpi"
    tasks: tuple[str, ...] | None = None  # None: manifest order of tasks with train records
    layers: int = 9  # J prompted layers (capped at the backbone's depth)
    tokens: int = 16  # N prompt tokens per modality
    rank: int = 4  # R, rank of the CP factors
    interaction_rank: int = 4  # R_i
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 0.0
    workers: int = 0  # data loader worker processes
    cache: bool = False  # hold decoded pixels in memory
    seed: int = 0
    device: str = dataclasses.field(default_factory=default_device)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        object.__setattr__(self, "manifest", Path(self.manifest))
        object.__setattr__(self, "out", Path(self.out))
        if self.tasks is not None:
            object.__setattr__(self, "tasks", tuple(self.tasks))


def start_or_resume(config: TrainConfig, backbone: Backbone, manifest_tasks: list[str]) -> RunState:
    """A new run's state, or the saved one after checking it matches this config."""
    depth = min(backbone.config.vision.layers, backbone.config.text.layers)
    prompt = PromptConfig(
        layers=min(config.layers, depth),
        tokens=config.tokens,
        rank=config.rank,
        interaction_rank=config.interaction_rank,
    )
    wanted = RunConfig(
        method=config.method,
        manifest=str(config.manifest),
        backbone=str(config.backbone),
        backbone_fingerprint=fingerprint(backbone),
        tasks=list(config.tasks) if config.tasks else manifest_tasks,
        prompt=prompt.to_dict(),
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        seed=config.seed,
    )
    state = load_state(config.out)
    if state is None:
        return RunState(wanted)
    saved, out = state.config, config.out
    if saved.backbone_fingerprint != wanted.backbone_fingerprint:
        raise RunError(f"{out}: the run used another backbone ({saved.backbone})")
    if saved.method != wanted.method or saved.prompt != wanted.prompt:
        raise RunError(f"{out}: the run used method {saved.method} with {saved.prompt}")
    # run.json records one recipe: a resume that trained on with another would lie about it.
    recipe = ("epochs", "batch_size", "lr", "weight_decay", "seed")
    changed = [
        f"{k} {getattr(saved, k)} -> {getattr(wanted, k)}"
        for k in recipe
        if getattr(saved, k) != getattr(wanted, k)
    ]
    if changed:
        raise RunError(f"{out}: the run was trained with other settings ({', '.join(changed)})")
    if wanted.tasks[: len(state.done)] != state.done:
        raise RunError(f"{out}: finished tasks {state.done} are not a prefix of {wanted.tasks}")
    state.config.tasks = wanted.tasks  # one more task may be added onto a finished run
    return state


def train_task(
    config: TrainConfig,
    backbone: Backbone,
    prompts: nn.Module,
    records: Sequence[Record],
    earlier: list[nn.Module],
    targets: Tensor | None,
    spec: MethodSpec,
    control: Control,
) -> list[float]:
    """Optimise one task's prompts; returns the mean loss of each epoch."""
    device = torch.device(config.device)
    loader = make_loader(
        records,
        backbone.config.vision.image_size,
        config.batch_size,
        shuffle=True,
        seed=config.seed,
        num_workers=config.workers,
        cache=config.cache,
        drop_last=True,
    )
    steps = config.epochs * len(loader)
    optimizer, scheduler = make_optimizer(
        prompts.parameters(), config.lr, config.weight_decay, steps
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    history, done = [], 0
    for epoch in range(config.epochs):
        total = 0.0
        for batch in tqdm(
            loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=None
        ):
            control.step(done, steps)
            with autocast:
                parts = step_loss(
                    backbone,
                    prompts,
                    batch.pixels.to(device),
                    batch.tokens.to(device),
                    earlier,
                    targets,
                    spec,
                )
            optimizer.zero_grad(set_to_none=True)
            parts["total"].backward()
            optimizer.step()
            scheduler.step()
            total += float(parts["total"].detach())
            done += 1
        history.append(total / len(loader))
    control.step(steps, steps)
    return history


def frozen_features(
    backbone: Backbone, records: Sequence[Record], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unprompted image and text features of a task's training data: its keys' inputs."""
    data = make_test_set(*eval_set(records, backbone.config.vision.image_size))
    with torch.no_grad():
        image = torch.cat([backbone.encode_image(p.to(device)) for p in data.pixels.split(256)])
        text = torch.cat([backbone.encode_text(t.to(device)) for t in data.tokens.split(256)])
    return image.cpu(), text.cpu()


def run_training(config: TrainConfig, control: Control = NO_CONTROL) -> RunState:
    """Train (or resume) the run `config` describes; its state, also saved in `config.out`.

    Raises RunError when `config.out` holds a run of another recipe, ValueError or OSError for
    bad data, `Cancelled` when `control` is cancelled (finished tasks stay saved).
    """
    device = torch.device(config.device)
    records = read_manifest(config.manifest, tasks=list(config.tasks) if config.tasks else None)
    backbone = load_backbone(config.backbone, device=device)
    config.out.mkdir(parents=True, exist_ok=True)
    state = start_or_resume(config, backbone, tasks_in_order(select(records, split="train")))
    spec, run = method_spec(config.method), state.config
    prompt_config = run.prompt_config()
    bank, keys = PromptBank(), load_keys(config.out) or TaskKeys()
    keys = keys.subset(state.done)  # a crash after saving keys but before run.json: drop it
    shared = new_prompts(config.method, prompt_config, backbone).to(device) if spec.shared else None
    finished = state.done if spec.trains else []  # zero-shot has no prompts to reload
    for index, task in enumerate(finished):  # resume: reload the finished tasks
        module = shared or new_prompts(config.method, prompt_config, backbone).to(device)
        load_task(config.out, index, task, module)
        bank.add(task, module)
    tests = {
        t: make_test_set(*eval_set(select(records, t, "test"), backbone.config.vision.image_size))
        for t in run.tasks
    }
    descriptions = describe_tasks(backbone, run.tasks)
    remaining = [task for task in run.tasks if task not in state.done]
    for index, task in enumerate(run.tasks):
        if task in state.done:
            continue
        position = remaining.index(task)
        part = control.part(
            position / len(remaining),
            (position + 1) / len(remaining),
            f"(task {position + 1}/{len(remaining)} {task})",
        )
        part.step(0, 1)
        torch.manual_seed(run.seed + index)
        start = time.perf_counter()
        train_records = select(records, task, "train")
        history = []
        if spec.trains:
            module = shared or new_prompts(config.method, prompt_config, backbone).to(device)
            earlier = [bank.tasks[name] for name in state.done if bank.tasks[name] is not module]
            similarity = losses.task_similarity(descriptions[: index + 1])
            targets = losses.task_targets(similarity)
            # The last tenth of a task's share is its keys and evaluation.
            history = train_task(
                config,
                backbone,
                module,
                train_records,
                earlier,
                targets,
                spec,
                part.part(0.0, 0.9),
            )
            bank.add(task, module)
            state.parameters_per_task = module.num_parameters()
        part.check()
        keys.add(task, *frozen_features(backbone, train_records, device))
        seen = {t: tests[t] for t in [*state.done, task]}
        result = evaluate_seen(backbone, bank if spec.trains else None, keys, seen)
        result.update(after_task=task, loss=history, seconds=time.perf_counter() - start)
        part.check()  # the last moment to stop without recording this task
        module_to_save = bank.tasks[task] if spec.trains else None
        if module_to_save is not None:
            save_task(
                config.out,
                index,
                task,
                module_to_save,
                {"method": config.method, "prompt": run.prompt, "loss": history},
            )
        save_keys(config.out, keys)
        state.done.append(task)
        state.results.append(json_safe(result))
        save_state(config.out, state)
        part.step(1, 1)
        log.info(
            "task %d/%d %s: R@1 oracle %s, %.0f s",
            index + 1,
            len(run.tasks),
            task,
            {t: round(v, 1) for t, v in result["r1"]["oracle"].items()},
            time.perf_counter() - start,
        )
    return state
