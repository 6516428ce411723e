"""Versioned task-prompt artifacts: one safetensors file per task, checked on every read.

A file holds the task's training factors (`train.*`), its folded prefix factors per encoder and
layer (`image.key_u` [J, N, R'], `image.key_m` [J, R', D_v], ... METHOD.md §6), and its task
keys (`keys.image`, `keys.text`, absent for imported prompts); the header's metadata holds the
format version, task id and name, prompt version (a content hash), backbone fingerprint,
shapes, dtype, creation time and training metrics, and a sha256 of every tensor.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from export.checks import (
    FACTORS,
    FORMAT,
    FORMAT_VERSION,
    REQUIRED,
    TOWERS,
    check_header,
    check_keys,
    check_prefix,
    check_ranks,
    check_tensors,
    shown,
    shown_name,
)
from export.errors import (
    ArtifactCorruptError,
    ArtifactDtypeError,
    ArtifactError,
    ArtifactHeaderError,
    ArtifactShapeError,
    ArtifactValueError,
    ArtifactVersionError,
    BackboneMismatchError,
    PromptVersionError,
)
from lpi import Backbone, FoldedTask, FoldedTower, TaskPrefix, fingerprint
from lpi.atomic import atomic_path

__all__ = [  # the errors live in export.errors; importing them from here keeps working
    "ArtifactCorruptError",
    "ArtifactDtypeError",
    "ArtifactError",
    "ArtifactHeaderError",
    "ArtifactShapeError",
    "ArtifactValueError",
    "ArtifactVersionError",
    "BackboneMismatchError",
    "PromptVersionError",
    "TaskArtifact",
    "content_version",
    "is_content_version",
    "read_artifact",
    "task_id",
    "tensors_digest",
    "write_artifact",
]

FOLD_TOLERANCE = 1e-5
VERSION_CHARS = 16  # a prompt version is the first 16 hex digits of the content hash
# Header fields the writer computes; `extra` may not replace them.
COMPUTED = (
    "format",
    "format_version",
    *REQUIRED,
    "rank_image",
    "rank_text",
    "width_image",
    "width_text",
    "dtype",
    "created",
    "metrics",
)


@dataclass(frozen=True)
class TaskArtifact:
    path: Path | None
    meta: dict
    folded: FoldedTask
    digest: str  # tensors_digest of the file's tensors, computed when it was read
    train: dict[str, Tensor] = field(default_factory=dict)
    keys: dict[str, Tensor] = field(default_factory=dict)  # "image"/"text": [M, E]

    @property
    def task_id(self) -> str:
        return str(self.meta["task_id"])

    @property
    def name(self) -> str:
        return str(self.meta["task_name"])

    @property
    def prompt_version(self) -> str:
        """The content hash of the tensors read, never the header's word for it."""
        return content_version(self.digest)

    def task_prefix(self) -> TaskPrefix:
        """Prefix keys and values [J, N, D] of both towers, materialised from the factors."""
        image_keys, image_values = self.folded.image.materialise()
        text_keys, text_values = self.folded.text.materialise()
        return TaskPrefix(image_keys, image_values, text_keys, text_values)


def task_id(name: str) -> str:
    """A file- and URL-safe id for a task name (at most 100 characters: a file name)."""
    slug = re.sub(r"[^a-z0-9_.-]+", "-", name.lower()).strip("-.")
    if not slug:
        raise ArtifactError(f"task name {name!r} gives an empty id")
    if len(slug) > 100:  # long names stay distinct: a hash of the whole name ends the id
        slug = f"{slug[:83].rstrip('-.')}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return slug


def content_version(digest: str) -> str:
    """The prompt version of content whose `tensors_digest` is `digest`: its first 16 hex
    digits. Writer and reader derive it alike, so a label always names its tensors."""
    return digest[:VERSION_CHARS]


def is_content_version(text: str) -> bool:
    """Whether `text` could be a prompt version: 16 lowercase hex digits, safe in a file name."""
    return isinstance(text, str) and re.fullmatch(f"[0-9a-f]{{{VERSION_CHARS}}}", text) is not None


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order: the content's identity."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.reshape(-1)  # a 0-d tensor has no byte view of its own
        digest.update(flat.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def build_tensors(
    folded: FoldedTask, train: dict[str, Tensor], keys: dict[str, Tensor], dtype: torch.dtype
) -> dict[str, Tensor]:
    tensors = {f"train.{k}": v.detach().float().cpu() for k, v in train.items()}
    for tower in TOWERS:
        factors = getattr(folded, tower)
        for name in FACTORS:
            tensors[f"{tower}.{name}"] = getattr(factors, name).detach().to(dtype).cpu()
    for modality, centres in keys.items():
        tensors[f"keys.{modality}"] = centres.detach().float().cpu()
    return {k: v.contiguous() for k, v in tensors.items()}


def write_artifact(
    path: Path,
    name: str,
    folded: FoldedTask,
    backbone: Backbone,
    train: dict[str, Tensor] | None = None,
    keys: dict[str, Tensor] | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
    dtype: torch.dtype = torch.float32,
    backbone_fingerprint: str | None = None,
) -> TaskArtifact:
    """Write one task's artifact atomically and return it as `read_artifact` would.

    `backbone_fingerprint` saves hashing the backbone's weights again for every task.
    """
    _check_fold_precision(name, folded, dtype)
    clash = sorted(set(extra or {}) & set(COMPUTED))
    if clash:
        raise ArtifactHeaderError(f"task {name!r}: extra may not set {', '.join(clash)}")
    tensors = build_tensors(folded, train or {}, keys or {}, dtype)
    checksum = tensors_digest(tensors)
    backbone_fingerprint = backbone_fingerprint or fingerprint(backbone)
    image, text = folded.image, folded.text
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task_id": task_id(name),
        "task_name": name,
        "prompt_version": content_version(checksum),
        "checksum": checksum,
        "backbone_fingerprint": backbone_fingerprint,
        "layers": image.key_u.shape[0],
        "tokens": image.key_u.shape[1],
        "rank_image": image.rank,
        "rank_text": text.rank,
        "width_image": image.key_m.shape[2],
        "width_text": text.key_m.shape[2],
        "dtype": str(dtype).removeprefix("torch."),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "metrics": metrics or {},
        **(extra or {}),
    }
    header = {key: json.dumps(value) for key, value in meta.items()}
    with atomic_path(path) as temp:
        save_file(tensors, str(temp), metadata=header)
    return read_artifact(path, backbone, backbone_fingerprint)


def _check_fold_precision(name: str, folded: FoldedTask, dtype: torch.dtype) -> None:
    """The stored (cast) factors must still reproduce the prefix to 1e-5 relative."""
    for tower in TOWERS:
        exact = getattr(folded, tower)
        cast = exact.to(dtype).to(exact.key_u.dtype)
        for approx, ref in zip(cast.materialise(), exact.materialise(), strict=True):
            error = float((approx - ref).norm() / ref.norm().clamp_min(1e-30))
            if error >= FOLD_TOLERANCE:
                raise ArtifactValueError(
                    f"task {name!r}: {dtype} factors reproduce the {tower} prefix to only "
                    f"{error:.1e} relative (need < 1e-5); export in float32"
                )


def read_artifact(
    path: str | Path, backbone: Backbone | None = None, backbone_fingerprint: str | None = None
) -> TaskArtifact:
    """Read and validate an artifact; pass the serving backbone to check it was made for it.

    Every header field the server reads is type-checked, every tensor it will use is checked
    (dtype, rank, shape, finite and bounded values, usable task keys), and the prompt version
    is the tensors' content hash: a header naming another one is refused. Nothing read from
    the file is ever used as a path. `backbone_fingerprint` saves hashing the backbone again.
    """
    path = Path(path)
    meta, tensors = _read_file(path)
    check_header(path, meta)
    check_tensors(path, tensors)
    if backbone is not None:  # before any check whose work grows with the header's J, N, D
        check_backbone(path, meta, backbone, backbone_fingerprint)
    digest = tensors_digest(tensors)
    if digest != meta["checksum"]:
        raise ArtifactCorruptError(f"{path}: tensor bytes do not match the recorded checksum")
    if meta["prompt_version"] != content_version(digest):
        raise PromptVersionError(
            f"{path}: the header names prompt version {shown(meta['prompt_version'])}, but the "
            f"tensors' content hash gives {content_version(digest)}",
            "artifact.prompt_version",
        )
    folded = _check_shapes(path, meta, tensors)
    check_ranks(path, meta, folded)
    bad = sorted(k for k, v in tensors.items() if not torch.isfinite(v).all())
    if bad:
        names = ", ".join(shown_name(k) for k in bad[:5])
        raise ArtifactValueError(f"{path}: NaN or Inf in {names}")
    train = {k.removeprefix("train."): v for k, v in tensors.items() if k.startswith("train.")}
    keys = {k.removeprefix("keys."): v for k, v in tensors.items() if k.startswith("keys.")}
    check_keys(path, keys, backbone.config.embed_dim if backbone is not None else None)
    check_prefix(path, folded)
    return TaskArtifact(path, meta, folded, digest, train, keys)


def _read_file(path: Path) -> tuple[dict, dict[str, Tensor]]:
    try:
        found = path.is_file()
    except OSError as err:  # a name too long, a permission: the file cannot be reached
        raise ArtifactCorruptError(f"{path}: cannot be read ({err.strerror})") from err
    if not found:
        raise ArtifactCorruptError(f"{path}: no such artifact file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as err:
        raise ArtifactCorruptError(f"{path}: not a readable safetensors file ({err})") from err
    try:
        meta = {key: json.loads(value) for key, value in header.items()}
    except (ValueError, RecursionError) as err:  # JSONDecodeError, or an int of 5000 digits
        reason = f"{type(err).__name__}: {str(err)[:80]}"
        raise ArtifactCorruptError(f"{path}: metadata is not JSON ({reason})") from err
    return meta, tensors


def _check_shapes(path: Path, meta: dict, tensors: dict[str, Tensor]) -> FoldedTask:
    layers, tokens = meta["layers"], meta["tokens"]
    towers = {}
    for tower in TOWERS:
        names = [f"{tower}.{factor}" for factor in FACTORS]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ArtifactShapeError(f"{path}: missing tensors {', '.join(missing)}")
        key_u, key_m, value_u, value_m = (tensors[n] for n in names)
        rank, width = key_u.shape[-1], key_m.shape[-1]
        expected = {
            "key_u": (layers, tokens, rank),
            "key_m": (layers, rank, width),
            "value_u": (layers, tokens, rank),
            "value_m": (layers, rank, width),
        }
        for factor, tensor in zip(FACTORS, (key_u, key_m, value_u, value_m), strict=True):
            if tuple(tensor.shape) != expected[factor]:
                raise ArtifactShapeError(
                    f"{path}: {tower}.{factor} has shape {tuple(tensor.shape)}, expected "
                    f"{expected[factor]} (J={layers}, N={tokens}, R'={rank}, D={width})"
                )
        if meta.get(f"width_{tower}", width) != width:
            raise ArtifactShapeError(
                f"{path}: {tower} width {width} != metadata {meta[f'width_{tower}']}"
            )
        towers[tower] = FoldedTower(key_u, key_m, value_u, value_m)
    return FoldedTask(towers["image"], towers["text"])


def check_backbone(
    path: Path | str, meta: dict, backbone: Backbone, expected: str | None = None
) -> None:
    """The artifact's backbone fingerprint and widths must be the serving backbone's."""
    config = backbone.config
    widths = (config.vision.width, config.text.width)
    if (meta.get("width_image"), meta.get("width_text")) != widths:
        raise BackboneMismatchError(
            f"{path}: widths {meta.get('width_image')}/{meta.get('width_text')} do not fit the "
            f"backbone's {widths[0]}/{widths[1]}"
        )
    depth = min(config.vision.layers, config.text.layers)
    if meta["layers"] > depth:
        raise BackboneMismatchError(
            f"{path}: J={meta['layers']} exceeds the backbone depth {depth}", "artifact.layers"
        )
    expected = expected or fingerprint(backbone)
    if meta["backbone_fingerprint"] != expected:
        raise BackboneMismatchError(
            f"{path}: made for backbone {meta['backbone_fingerprint'][:12]}, the serving "
            f"backbone is {expected[:12]}: re-export the task against it"
        )
