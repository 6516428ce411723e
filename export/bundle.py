"""One builder for a small self-made bundle: synthetic data, a backbone, trained tasks, artifacts.

The server's demo, the soak benchmark and the test suite all need the same thing offline: a
tiny CLIP and a few tasks trained on it. `build_bundle(recipe, out)` makes it by calling the
pipeline's API (`synthetic.generate`, `run_pretraining`, `run_training`, `export_run`), with
the whole recipe in one frozen dataclass, so the three callers differ only in their recipe.

Layout under `out`:

    data/                   manifest.jsonl (tasks), pretrain.jsonl, images/
    backbone.safetensors    pretrained on data/pretrain.jsonl, or a preset's random weights
    METHOD/                 one training run folder per method (run.json, task checkpoints)
    artifacts/METHOD/       one checked artifact per task and index.json (if `export`)

A `Control` stops the build between two steps (`Cancelled`) and hears its progress, one
fraction of the whole build; what is left under `out` is then unfinished and only the caller
knows whether to keep it (the demo builds in a scratch folder that it renames when complete).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lpi.continual.control import NO_CONTROL, Control
from lpi.continual.run_state import RunState

log = logging.getLogger(__name__)

# Progress weights: work units per stage, each about 1 ms on two CPU cores at 32 px for the
# tiny preset (the default demo build: 4,400 images drawn in 4 s, 60,000 image-epochs of
# pretraining in 50 s, 12,000 of prompt training with its evaluations in 9 s).
EXPORT_UNITS_PER_TASK = 300


@dataclass(frozen=True)
class BundleRecipe:
    """Everything a build depends on; the defaults are the test suite's tiny bundle."""

    # synthetic data (lpi.continual.data.synthetic)
    tasks: int = 2  # the first `tasks` synthetic tasks
    train_per_task: int = 24
    test_per_task: int = 12
    pretrain_images: int = 16
    image_size: int = 32
    # the frozen backbone
    preset: str = "tiny"
    pretrain_epochs: int = 0  # 0: the preset's random weights, no pretraining
    backbone_seed: int = 3  # its initial weights (and, when pretraining, its data order)
    pretrain_lr: float = 2e-3
    pretrain_weight_decay: float = 0.1
    pretrain_batch_size: int = 128  # CLIP's loss wants many negatives per batch
    # task prompts, one run per method (lpi.continual.trainer)
    methods: tuple[str, ...] = ("lpi",)
    layers: int = 2
    tokens: int = 4
    epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-2
    seed: int = 0  # of the data and of prompt training
    export: bool = True  # write artifacts/METHOD/ (one artifact per task)

    def __post_init__(self) -> None:
        from lpi.continual.methods import METHODS

        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods: {unknown or 'none'}; choose from {', '.join(METHODS)}")
        object.__setattr__(self, "methods", tuple(self.methods))


@dataclass(frozen=True)
class Bundle:
    """A built bundle's files, and each method's run state (its recall after each task)."""

    root: Path
    manifest: Path  # data/manifest.jsonl
    backbone: Path
    runs: dict[str, Path]  # method -> run folder
    states: dict[str, RunState]  # method -> its final state
    artifacts: dict[str, dict[str, Path]]  # method -> task -> artifact (empty without export)


def build_bundle(
    recipe: BundleRecipe, out: Path, device: str | None = None, control: Control = NO_CONTROL
) -> Bundle:
    """Build `recipe` under `out` (created) on `device` (None: CUDA if there is one); the
    result. Raises `Cancelled` if `control` is cancelled."""
    from lpi.continual.trainer import default_device

    device = device or default_device()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stages = _stages(recipe, control)
    data = _data(recipe, out / "data", stages["data"])
    backbone = _backbone(
        recipe, data / "pretrain.jsonl", out / "backbone.safetensors", device, stages["backbone"]
    )
    runs, states = {}, {}
    for method in recipe.methods:
        runs[method] = out / method
        states[method] = _train(
            recipe, method, data / "manifest.jsonl", backbone, runs[method], device, stages[method]
        )
    artifacts = {}
    if recipe.export:
        artifacts = _export(runs, backbone, out / "artifacts", stages["export"])
    return Bundle(out, data / "manifest.jsonl", backbone, runs, states, artifacts)


def _stages(recipe: BundleRecipe, control: Control) -> dict[str, Control]:
    """Each stage's control: a numbered label and a share of the progress in proportion to
    its work units."""
    units = {
        "data": recipe.tasks * (recipe.train_per_task + recipe.test_per_task)
        + recipe.pretrain_images
        + recipe.test_per_task,
        "backbone": recipe.pretrain_images * recipe.pretrain_epochs,
        **{m: recipe.tasks * recipe.train_per_task * recipe.epochs for m in recipe.methods},
    }
    labels = {
        "data": "drawing synthetic images",
        "backbone": f"pretraining the {recipe.preset} preset"
        if recipe.pretrain_epochs
        else f"a random {recipe.preset} backbone",
        **{m: f"training {m} prompts" for m in recipe.methods},
    }
    if recipe.export:
        units["export"] = EXPORT_UNITS_PER_TASK * recipe.tasks * len(recipe.methods)
        labels["export"] = "exporting task artifacts"
    total = sum(units.values())
    stages, start = {}, 0.0
    for index, (name, work) in enumerate(units.items(), start=1):
        end = start + work / total
        stages[name] = control.part(start, end, f"{index}/{len(units)}: {labels[name]}")
        start = end
    return stages


def _data(recipe: BundleRecipe, out: Path, control: Control) -> Path:
    from lpi.continual.data import synthetic

    control.step(0, 1)
    synthetic.generate(
        out,
        recipe.tasks,
        recipe.train_per_task,
        recipe.test_per_task,
        recipe.pretrain_images,
        recipe.image_size,
        recipe.seed,
        progress=False,
        control=control,
    )
    return out


def _backbone(
    recipe: BundleRecipe, pretrain: Path, out: Path, device: str, control: Control
) -> Path:
    """The preset pretrained on the pretraining split, or its random weights."""
    import lpi
    from lpi.continual.pretraining import PretrainConfig, run_pretraining

    control.step(0, 1)
    if not recipe.pretrain_epochs:
        lpi.save_backbone(lpi.load_backbone(recipe.preset, seed=recipe.backbone_seed), out)
        return out
    config = PretrainConfig(
        manifest=pretrain,
        out=out,
        preset=recipe.preset,
        epochs=recipe.pretrain_epochs,
        batch_size=recipe.pretrain_batch_size,
        lr=recipe.pretrain_lr,
        weight_decay=recipe.pretrain_weight_decay,
        seed=recipe.backbone_seed,
        device=device,
    )
    result = run_pretraining(config, control)
    log.debug("pretraining loss %.3f -> %.3f", result.history[0], result.history[-1])
    return out


def _train(
    recipe: BundleRecipe,
    method: str,
    manifest: Path,
    backbone: Path,
    out: Path,
    device: str,
    control: Control,
) -> RunState:
    from lpi.continual.trainer import TrainConfig, run_training

    config = TrainConfig(
        manifest=manifest,
        backbone=str(backbone),
        out=out,
        method=method,
        layers=recipe.layers,
        tokens=recipe.tokens,
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        seed=recipe.seed,
        device=device,
        cache=True,
    )
    return run_training(config, control)


def _export(runs: dict[str, Path], backbone: Path, out: Path, control: Control) -> dict:
    """One artifact per task and method, checked against the backbone file as a server loads it."""
    import lpi
    from export.tasks import export_run

    control.step(0, 1)
    model = lpi.load_backbone(backbone)
    artifacts = {}
    for done, (method, run) in enumerate(runs.items()):
        artifacts[method] = {a.name: a.path for a in export_run(run, model, out / method)}
        control.step(done + 1, len(runs))
    return artifacts
