"""A learning-rate sweep on the validation split: a thin loop over `run_training`.

Each (method, lr[, init std]) trains on the train split into its own run folder and is scored
on the val split only: the mean oracle R@1 (both directions) over every task after the last
one. The best lr per method (ties go to the smaller lr, then the smaller std) lands in
DIR/sweep.json, rewritten atomically after each finished point, so a stopped sweep resumes
where it stopped (and each run folder resumes itself). METHOD.md §4, optimisation note.

    DIR/sweep.json   {method: {"lr": best, "init_std": best, "score": s, "scores": {lr: s}, ...},
                      "base_recipe": {every other TrainConfig field the points share}}
    DIR/runs/<method>/lr<repr(lr)>[-std<repr(std)>]/   the runs ("run" in sweep.json, relative)

Scores of points trained under different recipes cannot be compared: a rerun with another base
recipe (epochs, batch size, tasks, prompt shape...) is refused, naming sweep.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from lpi import atomic
from lpi.continual.control import NO_CONTROL, Control
from lpi.continual.data.manifest import read_manifest, select
from lpi.continual.run_state import RunError, RunState
from lpi.continual.trainer import TrainConfig, run_training

log = logging.getLogger("lpi.sweep")

SWEEP_FILE = "sweep.json"
RECIPE_KEY = "base_recipe"  # not a method name: sweep.json's readers skip it (it has no "lr")
# Not the base recipe: what each point sets, and what changes how a run goes, not its result.
PER_POINT = frozenset({"lr", "init_std", "out", "eval_split", "method", "lr_source"})
OPERATIONAL = frozenset({"workers", "cache", "device"})


class SweepError(ValueError):
    """A sweep that cannot run or a sweep file that cannot be used; the message names the file."""


def val_score(state: RunState) -> float:
    """Mean oracle R@1 (mean of image->text and text->image) over all tasks, after the last."""
    last = state.results[-1]["r1"]["oracle"]
    return float(sum(last.values()) / len(last))


def point_key(lr: float, init_std: float | None) -> str:
    return repr(lr) if init_std is None else f"{lr!r}@{init_std!r}"


def point_folder(lr: float, init_std: float | None) -> str:
    """The point's run folder name: exact (repr round-trips a float, so two lrs never share a
    folder) and filesystem-safe (digits, '.', 'e', '+', '-', 'inf', 'nan')."""
    return f"lr{float(lr)!r}" + ("" if init_std is None else f"-std{float(init_std)!r}")


def base_recipe(config: TrainConfig) -> dict:
    """The TrainConfig fields every point of a sweep shares, as JSON."""
    recipe = {}
    for item in dataclasses.fields(config):
        if item.name in PER_POINT or item.name in OPERATIONAL:
            continue
        value = getattr(config, item.name)
        if isinstance(value, Path):
            value = str(value)
        recipe[item.name] = list(value) if isinstance(value, tuple) else value
    return recipe


def check_recipe(path: Path, sweep: dict, recipe: dict) -> None:
    """SweepError (naming sweep.json) when the sweep's points trained under another recipe."""
    saved = sweep.get(RECIPE_KEY)
    if not isinstance(saved, dict):
        raise SweepError(f"{path}: records no {RECIPE_KEY}: sweep into a new folder")
    changed = [
        f"{k} {saved.get(k)!r} -> {recipe.get(k)!r}"
        for k in sorted(saved.keys() | recipe.keys())
        if saved.get(k) != recipe.get(k)
    ]
    if changed:
        raise SweepError(
            f"{path}: the sweep's points trained with another {RECIPE_KEY} ({', '.join(changed)})"
        )


def _best(scores: dict[str, dict]) -> dict:
    """Highest score; ties to the smaller lr, then the smaller init std."""
    points = sorted(scores.values(), key=lambda p: (-p["score"], p["lr"], p["init_std"] or 0.0))
    return points[0]


def read_sweep(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SweepError(f"{path}: unreadable sweep file ({error})") from error
    if not isinstance(data, dict):
        raise SweepError(f"{path}: a sweep file is a JSON object keyed by method")
    return data


def chosen(path: str | Path, method: str) -> dict:
    """The chosen point of `method` in a sweep file: {"lr": ..., "init_std": ...}."""
    entry = read_sweep(path).get(method)
    if not isinstance(entry, dict) or not isinstance(entry.get("lr"), int | float):
        raise SweepError(f"{path}: no chosen learning rate for method {method!r}")
    return entry


def run_sweep(
    base: TrainConfig,
    methods: Sequence[str],
    lrs: Sequence[float],
    init_stds: Sequence[float] | None = None,
    control: Control = NO_CONTROL,
) -> dict:
    """Sweep into `base.out`; returns (and writes) the sweep file's content."""
    records = read_manifest(base.manifest, tasks=list(base.tasks) if base.tasks else None)
    if not select(records, split="val"):
        raise SweepError(
            f"{base.manifest}: no val records, so nothing to choose a learning rate on"
        )
    out = base.out
    path = out / SWEEP_FILE
    recipe = base_recipe(base)
    if path.exists():
        sweep = read_sweep(path)
        check_recipe(path, sweep, recipe)
    else:
        sweep = {RECIPE_KEY: recipe}
    stds: list[float | None] = list(init_stds) if init_stds else [None]
    points = [(lr, std) for lr in lrs for std in stds]
    total = len(methods) * len(points)
    for m_index, method in enumerate(methods):
        entry = sweep.setdefault(method, {"scores": {}, "points": {}})
        for p_index, (lr, std) in enumerate(points):
            key = point_key(lr, std)
            if key in entry["points"]:
                log.info("sweep point already done", extra={"method": method, "point": key})
                continue
            done = m_index * len(points) + p_index
            folder = out / "runs" / method / point_folder(lr, std)
            changes: dict = {"method": method, "lr": lr, "out": folder, "eval_split": "val"}
            if std is not None:
                changes["init_std"] = std
            config = dataclasses.replace(base, **changes)
            log.info("sweep point %d/%d", done + 1, total, extra={"method": method, "point": key})
            state = run_training(config, control.part(done / total, (done + 1) / total, key))
            score = val_score(state)
            entry["points"][key] = {
                "lr": lr,
                "init_std": std,
                "score": score,
                "run": str(folder.relative_to(out)),
            }
            entry["scores"][key] = score
            entry.update({k: v for k, v in _best(entry["points"]).items() if k != "run"})
            atomic.write_json(path, sweep)
            log.info("sweep score", extra={"method": method, "point": key, "val_r1": score})
    return sweep


__all__ = ["RunError", "SweepError", "chosen", "read_sweep", "run_sweep", "val_score"]
