"""Importing dense prompts trained elsewhere (one [N, D] tensor per layer and tower).

Accepted layouts, in a `.safetensors` file or a `.pt` state dict (read with weights_only):
stacked `prompts_v` [J, N, D_v] and `prompts_t` [J, N, D_t], or per layer `image.{j}` and
`text.{j}` [N, D] for j = 0..J-1. The prompts are folded like any task (SVD; dense when
R' would exceed N/2) and written as an artifact without task keys.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from export.artifact import ArtifactShapeError, TaskArtifact, task_id, write_artifact
from lpi import Backbone, DensePrompts, fold_task


def read_dense_prompts(path: Path) -> tuple[Tensor, Tensor]:
    """Image prompts [J, N, D_v] and text prompts [J, N, D_t] from either layout."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ArtifactShapeError(f"{path}: expected a dict of tensors")
    if "prompts_v" in state and "prompts_t" in state:
        return state["prompts_v"].float(), state["prompts_t"].float()
    return _stack_layers(path, state, "image"), _stack_layers(path, state, "text")


def _stack_layers(path: Path, state: dict, tower: str) -> Tensor:
    pattern = re.compile(rf"^{tower}\.(\d+)$")
    layers = {int(m[1]): v for k, v in state.items() if (m := pattern.match(k))}
    if not layers or sorted(layers) != list(range(len(layers))):
        raise ArtifactShapeError(
            f"{path}: need prompts_v/prompts_t [J, N, D] or {tower}.0..{tower}.J-1 [N, D]; "
            f"found {sorted(state)[:8]}"
        )
    return torch.stack([layers[j].float() for j in range(len(layers))])


def import_dense(path: Path, backbone: Backbone, name: str, out: Path) -> TaskArtifact:
    prompts_v, prompts_t = read_dense_prompts(path)
    widths = (backbone.config.vision.width, backbone.config.text.width)
    if (prompts_v.shape[-1], prompts_t.shape[-1]) != widths:
        raise ArtifactShapeError(
            f"{path}: prompt widths {prompts_v.shape[-1]}/{prompts_t.shape[-1]} do not fit the "
            f"backbone's {widths[0]}/{widths[1]}"
        )
    try:
        prompts = DensePrompts.from_tensors(prompts_v, prompts_t)
        prompts.config.check_fits(backbone.config)
    except ValueError as err:
        raise ArtifactShapeError(f"{path}: {err}") from err
    out.mkdir(parents=True, exist_ok=True)
    return write_artifact(
        out / f"{task_id(name)}.safetensors",
        name,
        fold_task(backbone, prompts),
        backbone,
        train=prompts.state_dict(),
        extra={"method": "dense-import", "source": path.name},
    )
