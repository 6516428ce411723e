"""`python -m lpi.train`: learn task prompts one task after another on a frozen backbone.

After each task: a checkpoint of its trainable parameters and the run metadata (atomic), its
task keys (K-Means of frozen features of its training data), and an evaluation of every task
seen so far. Rerunning the same command resumes after the last finished task; `--tasks` with
one more name adds a task onto a finished run. Spec sections 4 and 5.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lpi.checkpoint import fingerprint, load_backbone
from lpi.config import PromptConfig
from lpi.continual import losses
from lpi.continual.data.loader import eval_set, make_loader
from lpi.continual.data.manifest import read_manifest, select
from lpi.continual.data.manifest import tasks as tasks_in_order
from lpi.continual.evaluation import evaluate_seen, make_test_set, summarise
from lpi.continual.methods import (
    METHODS,
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lpi.train",
        description=__doc__.split("\n")[0],
        epilog="methods: " + "; ".join(f"{k}: {v}" for k, v in METHODS.items()),
    )
    parser.add_argument("--manifest", type=Path, required=True, help="JSONL task-split manifest")
    parser.add_argument("--backbone", required=True, help="checkpoint path or preset name")
    parser.add_argument("--out", type=Path, required=True, help="run folder (created/resumed)")
    parser.add_argument("--method", default="lpi", choices=list(METHODS))
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        help="task order (default: manifest order of tasks with train records)",
    )
    parser.add_argument("--layers", type=int, default=9, help="J prompted layers (capped at depth)")
    parser.add_argument("--tokens", type=int, default=16, help="N prompt tokens per modality")
    parser.add_argument("--rank", type=int, default=4, help="R, rank of the CP factors")
    parser.add_argument("--interaction-rank", type=int, default=4, help="R_i")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--cache", action="store_true", help="hold decoded pixels in memory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def start_or_resume(args: argparse.Namespace, backbone, manifest_tasks: list[str]) -> RunState:
    """A new run's state, or the saved one after checking it matches this command."""
    depth = min(backbone.config.vision.layers, backbone.config.text.layers)
    prompt = PromptConfig(
        layers=min(args.layers, depth),
        tokens=args.tokens,
        rank=args.rank,
        interaction_rank=args.interaction_rank,
    )
    config = RunConfig(
        method=args.method,
        manifest=str(args.manifest),
        backbone=str(args.backbone),
        backbone_fingerprint=fingerprint(backbone),
        tasks=args.tasks or manifest_tasks,
        prompt=prompt.to_dict(),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
    )
    state = load_state(args.out)
    if state is None:
        return RunState(config)
    saved = state.config
    if saved.backbone_fingerprint != config.backbone_fingerprint:
        raise RunError(f"{args.out}: the run used another backbone ({saved.backbone})")
    if saved.method != config.method or saved.prompt != config.prompt:
        raise RunError(f"{args.out}: the run used method {saved.method} with {saved.prompt}")
    # run.json records one recipe: a resume that trained on with another would lie about it.
    recipe = ("epochs", "batch_size", "lr", "weight_decay", "seed")
    changed = [f"{k} {getattr(saved, k)} -> {getattr(config, k)}" for k in recipe
               if getattr(saved, k) != getattr(config, k)]  # fmt: skip
    if changed:
        raise RunError(
            f"{args.out}: the run was trained with other settings ({', '.join(changed)})"
        )
    if config.tasks[: len(state.done)] != state.done:
        raise RunError(
            f"{args.out}: finished tasks {state.done} are not a prefix of {config.tasks}"
        )
    state.config.tasks = config.tasks  # one more task may be added onto a finished run
    return state


def train_task(args, backbone, prompts, records, earlier, targets, spec, device) -> list[float]:
    """Optimise one task's prompts; returns the mean loss of each epoch."""
    loader = make_loader(
        records,
        backbone.config.vision.image_size,
        args.batch_size,
        shuffle=True,
        seed=args.seed,
        num_workers=args.workers,
        cache=args.cache,
        drop_last=True,
    )
    optimizer, scheduler = make_optimizer(
        prompts.parameters(), args.lr, args.weight_decay, args.epochs * len(loader)
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    history = []
    for epoch in range(args.epochs):
        total = 0.0
        for batch in tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False):
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
        history.append(total / len(loader))
    return history


def frozen_features(backbone, records, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Unprompted image and text features of a task's training data: its keys' inputs."""
    data = make_test_set(*eval_set(records, backbone.config.vision.image_size))
    with torch.no_grad():
        image = torch.cat([backbone.encode_image(p.to(device)) for p in data.pixels.split(256)])
        text = torch.cat([backbone.encode_text(t.to(device)) for t in data.tokens.split(256)])
    return image.cpu(), text.cpu()


def run(args: argparse.Namespace) -> RunState:
    device = torch.device(args.device)
    records = read_manifest(args.manifest, tasks=args.tasks)
    backbone = load_backbone(args.backbone, device=device)
    args.out.mkdir(parents=True, exist_ok=True)
    state = start_or_resume(args, backbone, tasks_in_order(select(records, split="train")))
    spec, config = method_spec(args.method), state.config
    prompt_config = config.prompt_config()
    bank, keys = PromptBank(), load_keys(args.out) or TaskKeys()
    keys = keys.subset(state.done)  # a crash after saving keys but before run.json: drop it
    shared = new_prompts(args.method, prompt_config, backbone).to(device) if spec.shared else None
    finished = state.done if spec.trains else []  # zero-shot has no prompts to reload
    for index, task in enumerate(finished):  # resume: reload the finished tasks
        module = shared or new_prompts(args.method, prompt_config, backbone).to(device)
        load_task(args.out, index, task, module)
        bank.add(task, module)
    tests = {
        t: make_test_set(*eval_set(select(records, t, "test"), backbone.config.vision.image_size))
        for t in config.tasks
    }
    descriptions = describe_tasks(backbone, config.tasks)
    for index, task in enumerate(config.tasks):
        if task in state.done:
            continue
        torch.manual_seed(config.seed + index)
        start = time.perf_counter()
        train_records = select(records, task, "train")
        history = []
        if spec.trains:
            module = shared or new_prompts(args.method, prompt_config, backbone).to(device)
            earlier = [bank.tasks[name] for name in state.done if bank.tasks[name] is not module]
            similarity = losses.task_similarity(descriptions[: index + 1])
            targets = losses.task_targets(similarity)
            history = train_task(
                args, backbone, module, train_records, earlier, targets, spec, device
            )
            bank.add(task, module)
            state.parameters_per_task = module.num_parameters()
        keys.add(task, *frozen_features(backbone, train_records, device))
        seen = {t: tests[t] for t in [*state.done, task]}
        result = evaluate_seen(backbone, bank if spec.trains else None, keys, seen)
        result.update(after_task=task, loss=history, seconds=time.perf_counter() - start)
        module_to_save = bank.tasks[task] if spec.trains else None
        if module_to_save is not None:
            save_task(
                args.out,
                index,
                task,
                module_to_save,
                {"method": args.method, "prompt": config.prompt, "loss": history},
            )
        save_keys(args.out, keys)
        state.done.append(task)
        state.results.append(json_safe(result))
        save_state(args.out, state)
        log.info(
            "task %d/%d %s: R@1 oracle %s, %.0f s",
            index + 1,
            len(config.tasks),
            task,
            {t: round(v, 1) for t, v in result["r1"]["oracle"].items()},
            time.perf_counter() - start,
        )
    return state


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = parse_args(argv)
    try:
        state = run(args)
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
