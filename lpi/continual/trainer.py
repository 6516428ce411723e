"""Learning task prompts one task after another on a frozen backbone: `run_training(config)`.

After each task: a checkpoint of its trainable parameters and the run metadata (atomic), its
task keys (K-Means of frozen features of its training data), and an evaluation of every task
seen so far. Running the same config again resumes after the last finished task; `tasks` with
one more name adds a task onto a finished run. A run stopped through its `Control` (or killed)
loses only the task in progress. Spec sections 4 and 5. `python -m lpi.train` is its CLI.
"""

from __future__ import annotations

import dataclasses
import json
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
from lpi.continual import losses, similarity
from lpi.continual.control import NO_CONTROL, Control
from lpi.continual.data.loader import eval_set, make_loader
from lpi.continual.data.manifest import Record, read_manifest, select
from lpi.continual.data.manifest import tasks as tasks_in_order
from lpi.continual.evaluation import evaluate_seen, key_features, make_test_set
from lpi.continual.methods import (
    METHODS,
    MethodSpec,
    default_lr,
    describe_tasks,
    gradient_ratios,
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
from lpi.routing import CLUSTERS, TaskKeys, check_clusters

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
    interaction_rank: int = PromptConfig.interaction_rank  # R_i
    epochs: int = 5
    batch_size: int = 64
    lr: float | None = None  # peak lr; None: default_lr(method), the best the bench sweep found
    weight_decay: float = 0.0
    workers: int = 0  # data loader worker processes
    cache: bool = False  # hold decoded pixels in memory
    seed: int = 0
    device: str = dataclasses.field(default_factory=default_device)
    init_std: float = PromptConfig.init_std  # std of the factors' Normal init
    # L_task's S: this file; None = task_similarity.json beside the manifest if present
    similarity: Path | None = None
    similarity_from_descriptions: bool = False  # else S from the text tower (real CLIPs only)
    task_threshold: float = losses.TASK_THRESHOLD  # Y = S > threshold
    eval_split: str = "test"  # what each task's evaluation reads ("val" in a sweep)
    lr_source: str | None = None  # where lr came from (a sweep file), recorded in run.json
    key_centres: int = CLUSTERS  # routing keys: K-Means centres per task and modality

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        if self.eval_split not in ("val", "test"):
            raise ValueError(f"eval_split: {self.eval_split!r} is not 'val' or 'test'")
        check_clusters(self.key_centres)
        object.__setattr__(self, "manifest", Path(self.manifest))
        object.__setattr__(self, "out", Path(self.out))
        if self.similarity is not None:
            object.__setattr__(self, "similarity", Path(self.similarity))
        if self.tasks is not None:
            object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.lr is None:
            object.__setattr__(self, "lr", default_lr(self.method))
            if self.lr_source is None:
                object.__setattr__(self, "lr_source", f"default for {self.method}")

    @property
    def peak_lr(self) -> float:
        """`lr`, which __post_init__ has always filled in."""
        assert self.lr is not None
        return self.lr


def start_or_resume(config: TrainConfig, backbone: Backbone, manifest_tasks: list[str]) -> RunState:
    """A new run's state, or the saved one after checking it matches this config."""
    depth = min(backbone.config.vision.layers, backbone.config.text.layers)
    prompt = PromptConfig(
        layers=min(config.layers, depth),
        tokens=config.tokens,
        rank=config.rank,
        interaction_rank=config.interaction_rank,
        init_std=config.init_std,
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
        lr=config.peak_lr,
        weight_decay=config.weight_decay,
        seed=config.seed,
        task_threshold=config.task_threshold,
        eval_split=config.eval_split,
        lr_source=config.lr_source,
        similarity_from_descriptions=config.similarity_from_descriptions,
        key_centres=config.key_centres,
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
    recipe = (
        "epochs",
        "batch_size",
        "lr",
        "weight_decay",
        "seed",
        "task_threshold",
        "eval_split",
        "similarity_from_descriptions",
        "key_centres",
    )
    changed = [
        f"{k} {getattr(saved, k)} -> {getattr(wanted, k)}"
        for k in recipe
        if getattr(saved, k) != getattr(wanted, k)
    ]
    if changed:
        raise RunError(
            f"{out / 'run.json'}: the run was trained with other settings ({', '.join(changed)})"
        )
    if wanted.tasks[: len(state.done)] != state.done:
        raise RunError(f"{out}: finished tasks {state.done} are not a prefix of {wanted.tasks}")
    state.config.tasks = wanted.tasks  # one more task may be added onto a finished run
    return state


def resolve_similarity(config: TrainConfig, tasks: list[str]) -> similarity.TaskSimilarity | None:
    """The given S for `tasks` (read and checked before any training), or None."""
    path = config.similarity or similarity.default_path(config.manifest)
    return None if path is None else similarity.read_similarity(path, tasks)


# S from the text tower is recomputed on resume, perhaps on another device: last-bit noise.
RECOMPUTED_TOLERANCE = 1e-5


def check_same_similarity(out: Path, saved: dict | None, new: dict, done: list[str]) -> None:
    """RunError (naming run.json) unless S now is the S the finished tasks trained with: the
    same origin and, over those tasks, the same matrix. A resume must not switch S silently."""
    if saved is None or not done:
        return
    path = out / "run.json"
    if saved.get("origin") != new["origin"]:
        raise RunError(
            f"{path}: similarity: the run's S came from {saved.get('source')}, now from "
            f"{new['source']}"
        )
    if saved.get("matrix") is None or new["matrix"] is None:
        return
    old_at = {name: i for i, name in enumerate(saved["tasks"])}
    new_at = {name: i for i, name in enumerate(new["tasks"])}
    for a in done:
        for b in done:
            was = saved["matrix"][old_at[a]][old_at[b]]
            now = new["matrix"][new_at[a]][new_at[b]]
            if abs(was - now) > RECOMPUTED_TOLERANCE:
                raise RunError(
                    f"{path}: similarity: S[{a}][{b}] was {was} when the run trained, now {now}"
                )


def similarity_record(
    config: TrainConfig,
    given: similarity.TaskSimilarity | None,
    tasks: list[str],
    matrix: Tensor | None,
) -> dict:
    """What run.json says about L_task's S: its source, the matrix used and the threshold."""
    source: str | None
    origin: str | None
    if given is not None:
        path = config.similarity or similarity.default_path(config.manifest)
        source, origin = f"file {path}" + (f" ({given.source})" if given.source else ""), "file"
    elif matrix is not None:
        source = "cosines of the frozen text tower's features of the task names"
        origin = "descriptions"
    else:
        source = origin = None
    return {
        "origin": origin,
        "source": source,
        "threshold": config.task_threshold,
        "tasks": tasks,
        "matrix": None if matrix is None else matrix.tolist(),
        "task_loss": matrix is not None and method_spec(config.method).task_loss,
    }


def train_task(
    config: TrainConfig,
    backbone: Backbone,
    prompts: nn.Module,
    records: Sequence[Record],
    earlier: list[nn.Module],
    targets: Tensor | None,
    spec: MethodSpec,
    control: Control,
) -> tuple[list[float], dict[str, dict[str, float]]]:
    """Optimise one task's prompts; the mean loss of each epoch and, measured on the first
    batch at init, each auxiliary term's gradient ratio to L_clip's per factor."""
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
        prompts.parameters(), config.peak_lr, config.weight_decay, steps
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    history, done, ratios = [], 0, {}
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
            if done == 0:
                ratios = gradient_ratios(parts, prompts)
            optimizer.zero_grad(set_to_none=True)
            parts["total"].backward()
            optimizer.step()
            scheduler.step()
            total += float(parts["total"].detach())
            done += 1
        history.append(total / len(loader))
    control.step(steps, steps)
    return history, ratios


def task_matrix(
    config: TrainConfig,
    backbone: Backbone,
    given: similarity.TaskSimilarity | None,
    tasks: list[str],
    spec: MethodSpec,
) -> Tensor | None:
    """S over the run's tasks [K, K]: the given file, else (when asked) the frozen text tower's
    cosines of the task names, else None: L_task is off, said once in the log."""
    if given is not None:
        return torch.tensor(given.restricted(tasks), dtype=torch.float64)  # exact, as given
    if config.similarity_from_descriptions:
        return losses.task_similarity(describe_tasks(backbone, tasks)).double().cpu()
    if spec.task_loss and len(tasks) > 1:
        log.warning(
            "no task similarity: L_task is off for this run (ship task_similarity.json with "
            "the split, or pass --similarity-from-descriptions for a real pretrained CLIP)",
            extra={"manifest": str(config.manifest)},
        )
    return None


def run_training(config: TrainConfig, control: Control = NO_CONTROL) -> RunState:
    """Train (or resume) the run `config` describes; its state, also saved in `config.out`.

    Raises RunError when `config.out` holds a run of another recipe, ValueError or OSError for
    bad data, `Cancelled` when `control` is cancelled (finished tasks stay saved).
    """
    device = torch.device(config.device)
    records = read_manifest(config.manifest, tasks=list(config.tasks) if config.tasks else None)
    in_order = tasks_in_order(select(records, split="train"))
    wanted = list(config.tasks) if config.tasks else in_order
    missing = [t for t in wanted if not select(records, t, config.eval_split)]
    if missing:
        raise RunError(
            f"{config.manifest}: no {config.eval_split} records for task(s) {', '.join(missing)}"
        )
    given = resolve_similarity(config, wanted)  # a bad matrix stops the run here
    backbone = load_backbone(config.backbone, device=device)
    config.out.mkdir(parents=True, exist_ok=True)
    state = start_or_resume(config, backbone, in_order)
    spec, run = method_spec(config.method), state.config
    prompt_config = run.prompt_config()
    bank = PromptBank()
    keys = load_keys(config.out, run.key_centres) or TaskKeys(run.key_centres)
    keys = keys.subset(state.done)  # a crash after saving keys but before run.json: drop it
    shared = new_prompts(config.method, prompt_config, backbone).to(device) if spec.shared else None
    finished = state.done if spec.trains else []  # zero-shot has no prompts to reload
    for index, task in enumerate(finished):  # resume: reload the finished tasks
        module = shared or new_prompts(config.method, prompt_config, backbone).to(device)
        load_task(config.out, index, task, module)
        bank.add(task, module)
    size = backbone.config.vision.image_size
    tests = {
        t: make_test_set(*eval_set(select(records, t, config.eval_split), size)) for t in run.tasks
    }
    matrix = task_matrix(config, backbone, given, run.tasks, spec)
    record = similarity_record(config, given, run.tasks, matrix)
    check_same_similarity(config.out, run.similarity, record, state.done)
    run.similarity = record
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
        history: list = []
        if spec.trains:
            module = shared or new_prompts(config.method, prompt_config, backbone).to(device)
            earlier = [bank.tasks[name] for name in state.done if bank.tasks[name] is not module]
            targets = None
            if matrix is not None:
                window = matrix[: index + 1, : index + 1]
                targets = losses.task_targets(window, config.task_threshold).to(device)
            # The last tenth of a task's share is its keys and evaluation.
            history, ratios = train_task(
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
            log.info(
                "task %s: gradient ratios to L_clip at init %s",
                task,
                json.dumps(ratios),
                extra={"task": task, "gradient_ratios": ratios},
            )
        part.check()
        keys.add(task, *key_features(backbone, train_records))
        seen = {t: tests[t] for t in [*state.done, task]}
        result = evaluate_seen(backbone, bank if spec.trains else None, keys, seen)
        result.update(after_task=task, loss=history, seconds=time.perf_counter() - start)
        if spec.trains:
            result["gradient_ratios"] = ratios
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
