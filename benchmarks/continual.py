"""The continual benchmark: every method of METHOD.md §5 over seeds, resumable, for hours.

Each (config, seed) is one run folder, OUT/runs/CONFIG/seed-S: the trainer's run (run.json,
checkpoints, keys), its eval.json, its swap.json (lpi.continual.swap) and bench.json, the row
this script writes last, which marks the run finished. A rerun skips finished runs and resumes
a killed one after its last finished task; OUT/results.json (atomic) holds every finished row
and the list of missing ones, rewritten after each run. Per seed S the data (OUT/data/seed-S),
the prompt initialisation and the batch order change; the backbone is shared (pretrained once
on --backbone-seed's pretraining split, or --backbone). `benchmarks/continual_report.py
OUT/results.json` makes the table, the Pareto plot and the statistics.

    OMP_NUM_THREADS=1 python benchmarks/continual.py --out runs/continual
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch
from benchkit import write_json
from continual_data import (
    GENERATOR,
    add_data_flags,
    fashion_parameters,
    prepare_backbone,
    prepare_data,
)

from lpi.checkpoint import fingerprint, load_backbone
from lpi.config import PromptConfig
from lpi.continual import swap
from lpi.continual.evaluator import EvalConfig, run_evaluation
from lpi.continual.methods import default_lr, lr_family, method_spec, new_prompts
from lpi.continual.sweep import SWEEP_FILE, read_sweep
from lpi.continual.trainer import TrainConfig, default_device, run_training

log = logging.getLogger("benchmarks.continual")
FORMAT = 1
ROW = "bench.json"


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark row: a method at one prompt shape."""

    name: str
    method: str
    layers: int
    tokens: int
    rank: int
    family: str  # the Pareto curve it belongs to (dense, lpi, lpi-no-interaction) or the method
    parameters_per_task: int = 0
    matched_to: str | None = None  # the interaction config whose count this one matches
    interaction_rank: int = PromptConfig.interaction_rank  # R_i (LPI with interaction only)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add = parser.add_argument
    add("--out", type=Path, default=Path("runs/continual"), help="benchmark folder")
    add("--seeds", nargs="+", type=int, default=[0, 1, 2], help="data, prompt init, batch order")
    add("--configs", nargs="+", default=None, help="run only these configs (see --list)")
    add("--only", nargs="+", default=None, help="run only runs whose CONFIG/seed-S matches a glob")
    add("--list", action="store_true", help="print the configs with their parameter counts, exit")
    add("--sweep", type=Path, default=None, help="folder of sweep.json: per-method lr")
    add("--epochs", type=int, default=30, help="epochs per task")
    add("--batch-size", type=int, default=64)
    add("--layers", type=int, default=4, help="J of the LPI configs")
    add("--tokens", type=int, default=8, help="N of the LPI configs")
    add("--rank", type=int, default=4, help="R of the headline LPI and its ablations")
    add("--ranks", nargs="+", type=int, default=[1, 2, 4, 8, 16], help="LPI Pareto ranks")
    add(
        "--interaction-rank",
        type=int,
        default=PromptConfig.interaction_rank,
        help="R_i of the LPI configs",
    )
    add(
        "--low-interaction-ranks",
        nargs="*",
        type=int,
        default=[1, 2, 4],
        help="ranks R of extra LPI configs at R_i = 1, the interaction's fewest parameters "
        "(none: pass the flag empty)",
    )
    add("--dense-shapes", nargs="+", default=["1x2", "2x4", "4x8"], help="dense JxN shapes")
    add("--device", default=default_device())
    add_data_flags(parser)
    return parser.parse_args(argv)


def prompt_count(
    method: str,
    layers: int,
    tokens: int,
    rank: int,
    backbone,
    interaction_rank: int = PromptConfig.interaction_rank,
) -> int:
    """Trainable parameters per task of one config (0 for zero-shot)."""
    if not method_spec(method).trains:
        return 0
    depth = min(backbone.config.vision.layers, backbone.config.text.layers)
    config = PromptConfig(
        layers=min(layers, depth), tokens=tokens, rank=rank, interaction_rank=interaction_rank
    )
    return new_prompts(method, config, backbone).num_parameters()


def make_configs(args: argparse.Namespace, backbone) -> list[Config]:
    """Every row of the benchmark, in run order, with its parameter count per task."""
    j, n, r, ri = args.layers, args.tokens, args.rank, args.interaction_rank
    plan = [
        ("zero-shot", "zero-shot", j, n, r, "zero-shot", ri),
        ("shared", "shared", j, n, r, "shared", ri),
    ]
    for shape in args.dense_shapes:
        dj, dn = (int(v) for v in shape.lower().split("x"))
        plan.append((f"dense-J{dj}N{dn}", "dense", dj, dn, r, "dense", ri))
    for method in ("lpi", "lpi-no-interaction"):
        plan += [(f"{method}-R{rank}", method, j, n, rank, method, ri) for rank in args.ranks]
    plan += [(f"{m}-R{r}", m, j, n, r, m, ri) for m in ("lpi-no-layer", "lpi-no-task")]
    # LPI with the interaction at its fewest parameters: R_i = 1 (already the rows above at 1).
    low = args.low_interaction_ranks if ri != 1 else []
    plan += [(f"lpi-R{k}-Ri1", "lpi", j, n, k, "lpi-Ri1", 1) for k in low]
    configs = [
        Config(*p[:6], prompt_count(*p[1:5], backbone, p[6]), None, p[6])  # type: ignore[arg-type]
        for p in plan
    ]
    # Interaction vs none at a matched count: the no-interaction rank nearest lpi-R{r}'s count.
    target = prompt_count("lpi", j, n, r, backbone, ri)
    per_rank = {
        k: prompt_count("lpi-no-interaction", j, n, k, backbone) for k in range(1, 8 * r + 1)
    }
    matched = min(per_rank, key=lambda k: (abs(per_rank[k] - target), k))
    name = f"lpi-no-interaction-R{matched}"
    configs = [c for c in configs if c.name != name]
    configs.append(
        Config(
            name,
            "lpi-no-interaction",
            j,
            n,
            matched,
            "lpi-no-interaction",
            per_rank[matched],
            f"lpi-R{r}",
            ri,
        )
    )
    return configs


def sweep_points(folder: Path | None) -> dict[str, dict[str, float]]:
    """{method: {"lr": best[, "init_std": best]}} from FOLDER/sweep.json, {} without a sweep."""
    if folder is None:
        return {}
    number = (int, float)
    return {
        method: {k: float(entry[k]) for k in ("lr", "init_std") if isinstance(entry.get(k), number)}
        for method, entry in read_sweep(folder / SWEEP_FILE).items()
        if isinstance(entry, dict) and isinstance(entry.get("lr"), number)
    }


def train_config(args, config: Config, seed: int, manifest: Path, backbone: str, recipe: dict):
    """The trainer's config (L_task's S: task_similarity.json beside the manifest)."""
    optional = {"init_std": recipe["init_std"]} if recipe["init_std"] is not None else {}
    return TrainConfig(
        manifest=manifest,
        backbone=backbone,
        out=run_folder(args, config, seed),
        method=config.method,
        layers=config.layers,
        tokens=config.tokens,
        rank=config.rank,
        interaction_rank=config.interaction_rank,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=recipe["lr"],
        lr_source=recipe["lr_source"],
        cache=True,
        seed=seed,
        device=args.device,
        eval_split="test",  # forgetting is measured on the test split, as the final recall
        **optional,
    )


def run_folder(args: argparse.Namespace, config: Config, seed: int) -> Path:
    return args.out / "runs" / config.name / f"seed-{seed}"


def learning_rate(config: Config, points: dict[str, dict]) -> dict:
    """lr, init std and their source: the sweep's choice for the config's method, else for its
    family (`lr_family`: LPI's for its ablations and the shared prompt), else the trainer's
    default for the method (`default_lr`) and the default init."""
    for method in dict.fromkeys((config.method, lr_family(config.method))):
        if method in points:
            point = points[method]
            source = f"sweep: {method}"
            return {"lr": point["lr"], "init_std": point.get("init_std"), "lr_source": source}
    method = config.method
    return {"lr": default_lr(method), "init_std": None, "lr_source": f"default for {method}"}


def finished_row(folder: Path, wanted: dict) -> dict:
    """A finished run's row; refused when it was made with other settings than these."""
    row = json.loads((folder / ROW).read_text())
    if row["settings"] != wanted:
        changed = sorted(k for k in wanted if row["settings"].get(k) != wanted[k])
        raise SystemExit(
            f"{folder} was run with other settings ({', '.join(changed)}): "
            "delete it or use another --out"
        )
    return row


def settings(args: argparse.Namespace, config: Config, recipe: dict, backbone: str) -> dict:
    """What a finished row must match to be reused (else the rerun refuses, naming the run).
    The backbone is its fingerprint (a hash of configuration and weights)."""
    keys = ("epochs", "batch_size", "suite", "train_per_task", "val_per_task", "test_per_task")
    keys += ("tasks", "fashion_groups", "image_size")
    fixed = {k: getattr(args, k) for k in keys} | {"backbone": backbone}
    return {**dataclasses.asdict(config), **recipe} | fixed


def measure(folder: Path) -> dict:
    """Final recall, forgetting and routing of a finished run, from its eval.json."""
    report = json.loads((folder / "eval.json").read_text())
    final = report["final"]
    row = {
        "tasks": report["tasks"],
        "routing_accuracy": report["routing_accuracy_final"],
        "routing_confusion": final.get("routing_confusion"),
    }
    for mode in ("oracle", "routed"):
        per_task = [final[mode][t]["task"] for t in report["tasks"]]
        row[mode] = {
            f"r{k}": sum(0.5 * (r["i2t"][str(k)] + r["t2i"][str(k)]) for r in per_task)
            / len(per_task)
            for k in (1, 5, 10)
        }
        row[mode]["rsum"] = sum(
            v for r in per_task for d in ("i2t", "t2i") for v in r[d].values()
        ) / len(per_task)
        row[mode]["per_task_r1"] = final["r1"][mode]
        row[mode]["forgetting"] = report[mode]["mean_forgetting"]
    return row


def run_one(args, config: Config, seed: int, backbone: str, identity: str, points) -> dict:
    """Train, evaluate and swap one (config, seed), or return its finished row."""
    folder = run_folder(args, config, seed)
    recipe = learning_rate(config, points)
    wanted = settings(args, config, recipe, identity)
    if (folder / ROW).exists():
        return finished_row(folder, wanted)
    # only the backbone's seed needs the pretraining split in full
    pretrain = args.pretrain_images if seed == args.backbone_seed and not args.backbone else 1
    manifest = prepare_data(args, seed, pretrain)
    start = time.perf_counter()
    torch.manual_seed(seed)
    state = run_training(train_config(args, config, seed, manifest, backbone, recipe))
    middle = time.perf_counter()
    run_evaluation(EvalConfig(run=folder, device=args.device))
    after_eval = time.perf_counter()
    swapped = None
    if method_spec(config.method).trains:
        swapped = swap.write_swap(folder, device=args.device)
    seconds = {
        # summed over tasks from run.json, so a resumed run still counts its earlier tasks
        "train": sum(result.get("seconds", 0.0) for result in state.results),
        "this_attempt": time.perf_counter() - start,
        "eval": after_eval - middle,
        "swap": time.perf_counter() - after_eval,
    }
    seconds["total"] = seconds["train"] + seconds["eval"] + seconds["swap"]
    row = {
        "id": f"{config.name}/seed-{seed}",
        "config": config.name,
        "seed": seed,
        "settings": wanted,
        **measure(folder),
        "swap": swapped,
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    write_json(folder / ROW, row)
    return row


def machine() -> dict:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "gpu": gpu,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
    }


def finished_rows(args, configs: list[Config], points: dict[str, dict], backbone: str) -> dict:
    """Every finished row of the planned runs, each checked against today's settings."""
    rows = {}
    for config in configs:
        wanted = settings(args, config, learning_rate(config, points), backbone)
        for seed in args.seeds:
            folder = run_folder(args, config, seed)
            if (folder / ROW).exists():
                rows[f"{config.name}/seed-{seed}"] = finished_row(folder, wanted)
    return rows


def write_results(args, configs, rows, points, backbone, started: float) -> None:
    """OUT/results.json: the protocol, every config, every finished row, the missing ones."""
    planned = [f"{c.name}/seed-{s}" for c in configs for s in args.seeds]
    payload = {
        "format": FORMAT,
        "protocol": {
            "command": "python benchmarks/continual.py " + " ".join(args.argv),
            "seeds": args.seeds,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "tasks": args.tasks,
            "suite": args.suite,
            **fashion_parameters(args),  # what the data got: none where not installed
            "train_per_task": args.train_per_task,
            "val_per_task": args.val_per_task,
            "test_per_task": args.test_per_task,
            "backbone": backbone,
            "preset": None if args.backbone else args.preset,
            "pretrain_images": None if args.backbone else args.pretrain_images,
            "pretrain_epochs": None if args.backbone else args.pretrain_epochs,
            "data_generator": GENERATOR,
            "backbone_seed": None if args.backbone else args.backbone_seed,
            "default_lr": {family: default_lr(family) for family in ("lpi", "dense")},
            "sweep": None if args.sweep is None else str(args.sweep),
            "sweep_points": points,
        },
        "machine": machine(),
        "configs": [dataclasses.asdict(c) for c in configs],
        "runs": [rows[run] for run in planned if run in rows],
        "missing": [run for run in planned if run not in rows],
        "session_seconds": time.perf_counter() - started,
        "updated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    write_json(args.out / "results.json", payload)


def selected(args: argparse.Namespace, configs: list[Config]) -> list[tuple[Config, int]]:
    runs = [(c, s) for c in configs for s in args.seeds]
    if args.configs:
        unknown = set(args.configs) - {c.name for c in configs}
        if unknown:
            raise SystemExit(f"--configs: unknown {sorted(unknown)}; --list shows the configs")
        runs = [(c, s) for c, s in runs if c.name in args.configs]
    if args.only:
        runs = [
            (c, s)
            for c, s in runs
            if any(fnmatch.fnmatch(f"{c.name}/seed-{s}", p) for p in args.only)
        ]
    return runs


def estimate(spent: dict[str, list[float]], methods: list[str]) -> str:
    """', ETA N min' for the runs left: each at its method's mean so far, else the overall mean."""
    every = [t for times in spent.values() for t in times]
    if not every:
        return ""
    overall = sum(every) / len(every)
    left = sum(sum(spent[m]) / len(spent[m]) if m in spent else overall for m in methods)
    return f", ETA {left / 60:.0f} min"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    if args.list:  # counts depend on the architecture only: no data, no pretraining
        model = load_backbone(args.backbone or args.preset, device="cpu")
        for c in make_configs(args, model):
            print(
                f"{c.name:28s} {c.method:20s} J={c.layers} N={c.tokens} R={c.rank} "
                f"R_i={c.interaction_rank} params/task={c.parameters_per_task:,}"
            )
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    backbone = prepare_backbone(args)
    model = load_backbone(backbone, device="cpu")
    configs, identity = make_configs(args, model), fingerprint(model)
    points = sweep_points(args.sweep)
    rows = finished_rows(args, configs, points, identity)
    todo = [(c, s) for c, s in selected(args, configs) if f"{c.name}/seed-{s}" not in rows]
    log.info("%d runs finished, %d to run now", len(rows), len(todo))
    write_results(args, configs, rows, points, backbone, started)
    spent: dict[str, list[float]] = {}
    for index, (config, seed) in enumerate(todo):
        eta = estimate(spent, [c.method for c, _ in todo[index:]])
        log.info("run %d/%d %s seed %d%s", index + 1, len(todo), config.name, seed, eta)
        begin = time.perf_counter()
        row = run_one(args, config, seed, backbone, identity, points)
        spent.setdefault(config.method, []).append(time.perf_counter() - begin)
        rows[row["id"]] = row
        write_results(args, configs, rows, points, backbone, started)
        log.info(
            "run %d/%d %s seed %d: oracle R@1 %.2f, routed %.2f, %.0f s",
            index + 1,
            len(todo),
            config.name,
            seed,
            row["oracle"]["r1"],
            row["routed"]["r1"],
            spent[config.method][-1],
        )
    log.info("wrote %s (%.0f s)", args.out / "results.json", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
