"""What an engine checks, apart from running the model: that an artifact fits what the engine
holds, that rows match their keys, and that a new version's vectors are usable (the probe).

Why a module of its own: these are small pure functions shared by both engines (`engine.py`)
and by the service (`unusable_rows` guards every response); none holds state of its own.

Dimensions: B rows, S image side, T tokens, J prompted layers, N prompt tokens, E embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

import lpi
from export.artifact import TaskArtifact

if TYPE_CHECKING:
    from server.engine import Engine

Key = tuple[str, str]  # (task name, prompt version)
Modality = Literal["image", "text"]
TOWERS: tuple[Modality, ...] = ("image", "text")


class EngineError(ValueError):
    """An artifact (or a load) this engine cannot hold; `field` names what does not fit."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


# ---------------------------------------------------------------------------------- checks


def artifact_shape(artifact: TaskArtifact) -> tuple[int, int]:
    """(J, N) of the artifact (`read_artifact` has checked that both towers agree)."""
    layers, tokens, _ = artifact.folded.image.key_u.shape  # [J, N, R']
    return layers, tokens


def check_shape(artifact: TaskArtifact, layers: int, tokens: int, held: str) -> None:
    """J and N must be the engine's, fixed by `held` (the pool's, the ONNX export's)."""
    got_layers, got_tokens = artifact_shape(artifact)
    for field, got, want in (
        ("artifact.layers", got_layers, layers),
        ("artifact.tokens", got_tokens, tokens),
    ):
        if got != want:
            raise EngineError(
                f"task {artifact.name!r} has {field.split('.')[1]} {got}; {held} holds "
                f"{field.split('.')[1]} = {want} only",
                field,
            )


def check_rows(modality: str, inputs: Tensor, keys: Sequence[Key | None]) -> None:
    if modality not in TOWERS:
        raise ValueError(f"modality must be one of {TOWERS}, got {modality!r}")
    if inputs.dim() < 1 or inputs.shape[0] != len(keys):
        raise ValueError(f"{len(keys)} keys for inputs of shape {tuple(inputs.shape)}")


def already_loaded(key: Key) -> EngineError:
    return EngineError(f"task {key} is already loaded; remove it first", "task")


# ---------------------------------------------------------------------------------- probe

PROBE_TEXTS = ("a photo of a small red square", "")
# Features are unit-norm by construction; bfloat16 rounding moves a norm by under 1 %, so a row
# this far from 1 has no direction (zero) or was never normalised (overflow).
NORM_TOLERANCE = 0.1


def unusable_rows(features: Tensor) -> list[int]:
    """Rows [B, E] that are not finite unit vectors: never served, never stored."""
    norms = features.double().norm(dim=-1)  # [B]
    usable = torch.isfinite(features).all(dim=-1) & ((norms - 1).abs() <= NORM_TOLERANCE)
    return (~usable).nonzero().flatten().tolist()


def probe_inputs(image_size: int, context_length: int) -> dict[str, Tensor]:
    """A fixed batch per tower: seeded noise and a flat image [2, 3, S, S], two texts [2, T]."""
    noise = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    images = torch.cat([noise, torch.zeros_like(noise)])
    return {"image": images, "text": lpi.tokenize(list(PROBE_TEXTS), context_length)}


def probe(engine: Engine, key: Key) -> None:
    """Embed the probe batch under `key`; EngineError naming the artifact if any vector is
    non-finite or not unit-norm. Values inside every bound can still poison the encoders
    (overflowing softmax or LayerNorm), and only a forward pass shows it."""
    for modality, inputs in probe_inputs(engine.image_size, engine.context_length).items():
        bad = unusable_rows(engine.encode(modality, inputs, [key] * len(inputs)))
        if bad:
            raise EngineError(
                f"task {key[0]!r}: prompt version {key[1]} gives non-finite or zero {modality} "
                f"vectors on a probe batch ({len(bad)} of {len(inputs)}); refusing to serve it",
                "artifact",
            )


def probe_added(engine: Engine, key: Key) -> None:
    """`probe` a version just added; remove it again if it fails (the load changes nothing)."""
    try:
        probe(engine, key)
    except BaseException:
        engine.remove(key)
        raise
