"""A Hugging Face cache built by the tests, in huggingface_hub's own layout (no network).

models--ORG--NAME/refs/main holds the commit; snapshots/<commit>/<file> links to blobs/<hash>;
large files are named by their sha256, small ones by git's blob sha1.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lpi


def offline_cache(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache at `root` that huggingface_hub (and lpi.hub) will use, offline."""
    import huggingface_hub.constants

    root.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    return root


def cache_repo(cache: Path, repo: str, files: dict[str, bytes], commit: str | None = None) -> Path:
    """`files` cached as huggingface_hub stores a download of `repo` at `commit`."""
    commit = commit or hashlib.sha1(repo.encode()).hexdigest()
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for name, data in files.items():
        if name.endswith((".bin", ".safetensors")):
            digest = hashlib.sha256(data).hexdigest()
        else:
            digest = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
        blob = root / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root / "snapshots" / commit


def tiny_weights(tmp_path: Path, name: str, seed: int, config: lpi.ClipConfig | None = None):
    """A random tiny CLIP written as open_clip does (OpenAI key names), and its bytes."""
    torch.manual_seed(seed)
    model = lpi.Backbone(config or lpi.load_preset("tiny"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "files" / name
    path.parent.mkdir(exist_ok=True)
    if name.endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path, path.read_bytes()
