"""Backbones by name, through huggingface_hub's cache: `ARCH:TAG`, `hf-hub:ORG/NAME`, `ORG/NAME`.

- `ViT-B-32:openai`: an open_clip pretrained tag, looked up in `lpi.pretrained`'s table;
- `hf-hub:ORG/NAME` or `ORG/NAME`: a hub repository in open_clip's layout
  (`open_clip_model.safetensors` / `open_clip_pytorch_model.bin`, `open_clip_config.json`) or
  a Hugging Face `CLIPModel` (`config.json` + `model.safetensors` / `pytorch_model.bin`);
  `@REVISION` pins a branch, tag or commit.

Files live in the standard cache (HF_HUB_CACHE, else HF_HOME/hub, read when called so a test
or an operator can point it elsewhere). Nothing is downloaded unless the caller allows it;
huggingface_hub writes each download to a temporary name and renames it when complete, and
every cached file is checked against the hash it is stored under before it is trusted (once
per process), so a truncated or damaged file is named, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lpi import pretrained
from lpi.checkpoint import CheckpointError
from lpi.config import ClipConfig
from lpi.preprocess import OPENAI_MEAN, OPENAI_STD

log = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_OPEN_CLIP_CONFIG = "open_clip_config.json"
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # lpi.checkpoint reads them in this order
# Verified blobs as (path, size, mtime). A server resolves its backbone before it starts
# (to fail fast) and again when it loads it; hashing a large file twice would double the wait.
_VERIFIED: set[tuple[str, int, int]] = set()


@dataclass(frozen=True)
class Resolved:
    """A name made local: the file or snapshot folder to read, and what the weights cannot say."""

    name: str
    repo: str
    revision: str  # the snapshot's commit
    path: Path  # open_clip weights file, or a CLIPModel snapshot folder
    activation: str | None = None
    vision_head_width: int | None = None
    text_heads: int | None = None

    def apply(self, config: ClipConfig) -> ClipConfig:
        """The inferred architecture with this model's head counts and activation."""
        data = config.to_dict()
        if self.vision_head_width:
            data["vision"]["heads"] = max(1, data["vision"]["width"] // self.vision_head_width)
        if self.text_heads:
            data["text"]["heads"] = self.text_heads
        if self.activation:
            data["activation"] = self.activation
        try:
            return ClipConfig.from_dict(data)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"invalid architecture ({err})") from err


def is_model_name(name: str) -> bool:
    """Whether `name` is meant as a model name rather than a local path."""
    if name.startswith(HUB_PREFIX):
        return True
    if ":" in name and "/" not in name and "\\" not in name:
        return True  # ARCH:TAG
    return bool(_REPO_ID.match(name))


def resolve(name: str, allow_download: bool = False) -> Resolved:
    """The local files of a model name, downloading them only if `allow_download`."""
    if ":" in name and not name.startswith(HUB_PREFIX):
        try:
            row = pretrained.lookup(name)
        except pretrained.UnknownTagError as err:
            raise CheckpointError(str(err)) from None
        weights = _first(name, row.repo, None, pretrained.WEIGHT_FILES, allow_download)
        if weights is None:
            raise _missing(name, row.repo, pretrained.WEIGHT_FILES, allow_download)
        return Resolved(
            name=name,
            repo=row.repo,
            revision=_revision_of(weights),
            path=weights,
            activation=row.activation,
            vision_head_width=row.vision_head_width,
        )
    repo, _, revision = name.removeprefix(HUB_PREFIX).partition("@")
    if not _REPO_ID.match(repo):
        raise CheckpointError(f"model {name!r}: {repo!r} is not a hub id (ORG/NAME)")
    return _resolve_repo(name, repo, revision or None, allow_download)


def _resolve_repo(name: str, repo: str, revision: str | None, allow: bool) -> Resolved:
    weights = _first(name, repo, revision, pretrained.WEIGHT_FILES, allow)
    if weights is not None:  # open_clip's layout; its config says what the weights cannot
        config = _fetch(name, repo, revision, _OPEN_CLIP_CONFIG, allow)
        hints = _open_clip_hints(name, config) if config else {}
        return Resolved(name, repo, _revision_of(weights), weights, **hints)
    config = _fetch(name, repo, revision, "config.json", allow)
    if config is not None:
        _check_clip_config(name, config)
        weights = _first(name, repo, revision, _HF_WEIGHTS, allow)
        if weights is not None:
            return Resolved(name, repo, _revision_of(weights), weights.parent)
    raise _missing(name, repo, (*pretrained.WEIGHT_FILES, "config.json", *_HF_WEIGHTS), allow)


def _first(
    name: str, repo: str, revision: str | None, files: Iterable[str], allow: bool
) -> Path | None:
    for filename in files:
        path = _fetch(name, repo, revision, filename, allow)
        if path is not None:
            return path
    return None


def _fetch(name: str, repo: str, revision: str | None, filename: str, allow: bool) -> Path | None:
    """One verified file of `repo` from the cache (or the hub, if allowed); None if it has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    def download(force: bool = False) -> Path:
        with _progress_bars_on_terminal():
            return Path(
                hf_hub_download(
                    repo,
                    filename,
                    revision=revision,
                    cache_dir=cache_dir(),
                    local_files_only=not allow,
                    force_download=force,
                )
            )

    try:
        path = download()
        if not _intact(path):
            if not allow:
                raise CheckpointError(
                    f"model {name!r}: the cached {filename} of {repo} ({path.resolve()}) does "
                    f"not match its hash (truncated or damaged); allow a download to fetch it again"
                )
            log.warning("re-downloading a damaged file", extra={"repo": repo, "file": filename})
            path = download(force=True)
            if not _intact(path):
                raise CheckpointError(f"model {name!r}: {repo}/{filename} fails its hash check")
        return path
    except LocalEntryNotFoundError as err:
        if not allow:
            return None  # not in the cache
        raise CheckpointError(
            f"model {name!r}: {repo}/{filename} is not cached and the hub cannot be reached "
            f"({_first_line(err, 'not cached')})"
        ) from None
    except EntryNotFoundError:  # the repository has no such file
        return None
    except GatedRepoError:
        raise CheckpointError(
            f"model {name!r}: {repo} is gated; accept its terms on the hub and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"model {name!r}: no repository {repo!r} on the hub (or it is private: set HF_TOKEN)"
        ) from None
    except CheckpointError:
        raise
    except Exception as err:  # network, revision, permission: one line, the model named
        first = _first_line(err, type(err).__name__)
        raise CheckpointError(f"model {name!r}: cannot fetch {repo}/{filename} ({first})") from err


def _first_line(err: Exception, empty: str) -> str:
    """An error's first line (at most 200 characters): messages stay one line."""
    return (str(err).strip().splitlines() or [empty])[0][:200]


def _missing(name: str, repo: str, files: tuple[str, ...], allow: bool) -> CheckpointError:
    if allow:
        return CheckpointError(
            f"model {name!r}: {repo} holds no CLIP weights (looked for {', '.join(files)})"
        )
    return CheckpointError(
        f"model {name!r} is not in the Hugging Face cache ({cache_dir() or 'default'}) and "
        f"downloads are off: allow them (python -m server --allow-download, LPI_ALLOW_DOWNLOAD=1, "
        f"or allow_download=True) or fetch it first: hf download {repo} {files[0]}"
    )


def cache_dir() -> str | None:
    """HF_HUB_CACHE, else HF_HOME/hub, read now (huggingface_hub reads them once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _revision_of(path: Path) -> str:
    """The commit a cached file belongs to: its folder under snapshots/."""
    parts = path.parts
    if "snapshots" in parts:
        return parts[parts.index("snapshots") + 1]
    return "unknown"


def _intact(path: Path) -> bool:
    """Whether a cached file matches the hash its blob is named by (sha256 for large files,
    git's sha1 for small ones); a blob named otherwise cannot be checked and is trusted."""
    blob = path.resolve()
    stat = blob.stat()
    key = (str(blob), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return True
    if re.fullmatch(r"[0-9a-f]{64}", blob.name):
        digest = hashlib.sha256()
    elif re.fullmatch(r"[0-9a-f]{40}", blob.name):
        digest = hashlib.sha1(usedforsecurity=False)
        digest.update(f"blob {stat.st_size}\0".encode())
    else:
        return True
    with blob.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    if digest.hexdigest() != blob.name:
        return False
    _VERIFIED.add(key)
    return True


def _check_clip_config(name: str, path: Path) -> None:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"model {name!r}: config.json is not JSON ({err})") from err
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "clip":
        raise CheckpointError(
            f"model {name!r} is not a CLIP model (config.json model_type {model_type!r}, "
            f"expected 'clip')"
        )


def _open_clip_hints(name: str, path: Path) -> dict:
    """Activation and head counts from open_clip_config.json; refuses what lpi cannot serve.

    Every value read is type-checked here: a malformed config is a CheckpointError naming the
    field, never a bare ValueError or AttributeError from deep inside."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"model {name!r}: unreadable {_OPEN_CLIP_CONFIG} ({err})") from err
    data = _section(name, data, "")
    model = _section(name, data.get("model_cfg", {}), "model_cfg")
    prep = _section(name, data.get("preprocess_cfg", {}), "preprocess_cfg")
    vision = _section(name, model.get("vision_cfg", {}), "model_cfg.vision_cfg")
    text = _section(name, model.get("text_cfg", {}), "model_cfg.text_cfg")
    if vision.get("timm_model_name") or text.get("hf_model_name"):
        raise CheckpointError(
            f"model {name!r}: timm or Hugging Face towers inside open_clip are unsupported"
        )
    _check_preprocessing(name, prep)
    return {
        "activation": "quick_gelu" if model.get("quick_gelu") else "gelu",
        "vision_head_width": _count(name, vision.get("head_width", 64), "vision_cfg.head_width"),
        "text_heads": _count(name, text["heads"], "text_cfg.heads") if "heads" in text else None,
    }


def _section(name: str, value: object, where: str) -> dict:
    if not isinstance(value, dict):
        place = where or "the top level"
        raise CheckpointError(
            f"model {name!r}: {_OPEN_CLIP_CONFIG} {place} must be an object, got "
            f"{type(value).__name__}"
        )
    return value


def _count(name: str, value: object, where: str) -> int:
    """A positive integer (a head count or width); JSON's 64.0 is accepted, true and "64" not."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is not int or not 1 <= value <= 1 << 16:
        raise CheckpointError(
            f"model {name!r}: {_OPEN_CLIP_CONFIG} {where} must be a positive integer, got "
            f"{ascii(value)[:40]}"
        )
    return value


def _check_preprocessing(name: str, prep: dict) -> None:
    """lpi.preprocess is OpenAI's: another mean, std or resize would give wrong vectors."""

    def close(values: Any, reference: Sequence[float]) -> bool:
        numbers = isinstance(values, list | tuple) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        )
        return (
            numbers
            and len(values) == 3
            and all(abs(a - b) < 1e-6 for a, b in zip(values, reference, strict=True))
        )

    mean, std = prep.get("mean", OPENAI_MEAN), prep.get("std", OPENAI_STD)
    resize = prep.get("resize_mode", "shortest")
    if not (close(mean, OPENAI_MEAN) and close(std, OPENAI_STD)) or resize != "shortest":
        raise CheckpointError(
            f"model {name!r} expects other preprocessing (mean {ascii(mean)[:60]}, std "
            f"{ascii(std)[:60]}, resize {ascii(resize)[:40]}) than the OpenAI statistics and "
            "centre crop lpi.preprocess applies"
        )


@contextmanager
def _progress_bars_on_terminal() -> Iterator[None]:
    """huggingface_hub's download bars only when stderr is a terminal (logs stay one format)."""
    from huggingface_hub.utils.tqdm import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    quiet = not sys.stderr.isatty() and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        yield
    finally:
        if quiet:
            enable_progress_bars()


def describe(resolved: Resolved) -> str:
    """`repo@commit` (and the name when it differs), for logs and /readyz."""
    where = f"{resolved.repo}@{resolved.revision[:12]}"
    bare = resolved.name.removeprefix(HUB_PREFIX).partition("@")[0]
    return where if bare == resolved.repo else f"{where} ({resolved.name})"
