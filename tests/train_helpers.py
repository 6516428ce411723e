"""Shared by the training tests: the TrainConfig of a short run on the tiny bundle's backbone."""

from __future__ import annotations

from pathlib import Path

from export.bundle import BundleRecipe
from lpi.continual.trainer import TrainConfig


def tiny_train_config(tiny_runs: Path, data: Path, out: Path, **changes: object) -> TrainConfig:
    """2 prompted layers, 4 tokens, 1 epoch of batches of 8, pixels cached, on the CPU; the
    data folder `data` (its manifest.jsonl) and run folder `out`; `changes` override fields."""
    fields: dict[str, object] = dict(
        manifest=data / "manifest.jsonl",
        backbone=str(tiny_runs / "backbone.safetensors"),
        out=out,
        layers=2,
        tokens=4,
        epochs=1,
        batch_size=8,
        lr=BundleRecipe().lr,  # as the tiny runs (the bundle's recipe), not the method default
        cache=True,
        device="cpu",
    )
    return TrainConfig(**(fields | changes))  # type: ignore[arg-type]
