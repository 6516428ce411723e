"""Hostile artifacts for the tests: a real artifact's header and tensors, edited and re-saved.

`seal` recomputes the checksum and prompt version as a writer would, so an edit reaches the
checks behind them; skip it to test those checks themselves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

import lpi
from export.artifact import content_version, tensors_digest

ADMIN = {"authorization": "Bearer admin-secret"}
QUERY = {"authorization": "Bearer query-secret"}
OCTETS = {"content-type": "application/octet-stream"}


def read_raw(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as handle:
        meta = {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    return meta, tensors


def seal(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The header with the checksum and prompt version of these tensors."""
    digest = tensors_digest(tensors)
    return meta | {"checksum": digest, "prompt_version": content_version(digest)}


def artifact_bytes(meta: dict, tensors: dict, raw: dict[str, str] | None = None) -> bytes:
    """Safetensors bytes; `raw` header values are stored as given (not JSON-encoded)."""
    header = {k: json.dumps(v) for k, v in meta.items()} | (raw or {})
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=header)


def write_raw(path: Path, meta: dict, tensors: dict, raw: dict[str, str] | None = None) -> Path:
    path.write_bytes(artifact_bytes(meta, tensors, raw))
    return path


def random_folded(backbone: lpi.Backbone, seed: int) -> lpi.FoldedTask:
    """A folded task (J=2, N=4, rank 3) whose every prompt factor is drawn N(0, 0.2)."""
    prompts = lpi.TaskPrompts.for_backbone(lpi.PromptConfig(layers=2, tokens=4, rank=3), backbone)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in prompts.parameters():
            parameter.normal_(0, 0.2)
    return lpi.fold_task(backbone, prompts)


def files_outside(root: Path, inside: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `root` but not under `inside`: path -> (size, mtime)."""
    seen = {}
    for folder, dirs, files in os.walk(root):  # never follows symlinks
        for name in dirs + files:
            path = Path(folder) / name
            if not path.is_relative_to(inside):
                stat = path.lstat()
                seen[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return seen


def is_unit_vector_list(rows) -> bool:
    """Served vectors: lists of finite numbers (never None) with norm 1 (float32, 1e-4)."""
    for row in rows or []:
        if any(v is None for v in row):
            return False
        vector = torch.tensor(row, dtype=torch.float64)
        if not torch.isfinite(vector).all() or abs(float(vector.norm()) - 1) > 1e-4:
            return False
    return True
