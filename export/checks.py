"""What an artifact read from anywhere must satisfy before a server may use it.

Why a module of its own: an artifact may come from a hostile upload, so every header field the
server shows or compares is type-checked, every tensor it will use is checked for dtype, rank,
size and values, and nothing here ever touches the file system. `artifact.py` reads the file and
calls these in order; each failure names its field ("artifact.<header field or tensor>").

Dimensions: J prompted layers, N prompt tokens, R' a tower's rank, D its width, M task-key
centres, E the embedding width.
"""

from __future__ import annotations

import json

import torch
from torch import Tensor

from export.errors import (
    ArtifactDtypeError,
    ArtifactHeaderError,
    ArtifactShapeError,
    ArtifactValueError,
    ArtifactVersionError,
)
from lpi import FoldedTask
from lpi.routing import check_centres

FORMAT = "lpi-task"
FORMAT_VERSION = 1
TOWERS = ("image", "text")
FACTORS = ("key_u", "key_m", "value_u", "value_m")
KEY_TENSORS = ("keys.image", "keys.text")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Prefix keys and values are attention keys and values of a CLIP layer (order 10 in trained
# models); one beyond float16's largest finite value (65504) would be infinite in a half-
# precision slot pool, and larger ones only poison the softmax. Far from any trained value.
PREFIX_LIMIT = 65504.0
MAX_TEXT = 256  # characters of a header string the server shows (names, versions, hashes)
MAX_CENTRES = 4096  # task-key centres per modality (the paper uses 5)
PREFIX_CHUNK = 1 << 22  # float64 elements of U @ M formed at once by the bound (32 MiB)

REQUIRED = (
    "task_id",
    "task_name",
    "prompt_version",
    "checksum",
    "backbone_fingerprint",
    "layers",
    "tokens",
)
# Header fields the server reads, with their type and range; others are carried, never read.
# J is also held to the serving backbone's depth and D to its widths (artifact.check_backbone,
# before any tensor is read for its values); N is at most 4096; R' at most D (check_ranks).
INTEGERS = {
    "layers": (1, 1024),
    "tokens": (1, 4096),
    "rank_image": (0, 1 << 16),
    "rank_text": (0, 1 << 16),
    "width_image": (1, 1 << 16),
    "width_text": (1, 1 << 16),
    "parameters": (0, 1 << 48),
}
TEXTS = (
    "task_id",
    "task_name",
    "prompt_version",
    "checksum",
    "backbone_fingerprint",
    "dtype",
    "created",
    "method",
    "source",
)
NULLABLE = ("method",)
OBJECTS = ("metrics", "prompt")


def shown(value: object, limit: int = 40) -> str:
    """A header value as an error message may quote it: repr (ASCII-safe), cut short."""
    text = ascii(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def shown_name(name: str) -> str:
    """A tensor or field name as a message shows it: unquoted, ASCII-escaped, cut short."""
    text = ascii(str(name))[1:-1]
    return text if len(text) <= 60 else f"{text[:57]}..."


# ---------------------------------------------------------------------------------- header


def check_header(path: object, meta: dict) -> None:
    """Format, version, required fields, and the type and range of every field read later."""
    if meta.get("format") != FORMAT:
        raise ArtifactVersionError(
            f"{path}: not an lpi task artifact (format {shown(meta.get('format'))})"
        )
    if type(meta.get("format_version")) is not int or meta["format_version"] != FORMAT_VERSION:
        raise ArtifactVersionError(
            f"{path}: format version {shown(meta.get('format_version'))}; this version of "
            f"lpi-serve reads version {FORMAT_VERSION}: re-export the task with it"
        )
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ArtifactShapeError(f"{path}: metadata lacks {', '.join(missing)}")
    for name, (low, high) in INTEGERS.items():
        value = meta.get(name, low)
        if type(value) is not int or not low <= value <= high:  # bool is not an int here
            raise ArtifactHeaderError(
                f"{path}: header field {name} must be an integer in [{low}, {high}], got "
                f"{shown(value)}",
                f"artifact.{name}",
            )
    for name in TEXTS:
        value = meta.get(name, "")
        if value is None and name in NULLABLE:
            continue
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise ArtifactHeaderError(
                f"{path}: header field {name} must be a string of at most {MAX_TEXT} "
                f"characters, got {shown(value)}",
                f"artifact.{name}",
            )
    for name in OBJECTS:
        if not isinstance(meta.get(name, {}), dict):
            raise ArtifactHeaderError(
                f"{path}: header field {name} must be an object", f"artifact.{name}"
            )
    _check_text(path, meta)


def _check_text(path: object, meta: dict) -> None:
    """Every string must be UTF-8 (JSON allows lone surrogates, which no response can carry)."""
    for name, value in meta.items():
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except (UnicodeEncodeError, ValueError, RecursionError):
            raise ArtifactHeaderError(
                f"{path}: header field {shown_name(name)} holds text that is not UTF-8",
                f"artifact.{name}" if name.isidentifier() else "artifact",
            ) from None


# ---------------------------------------------------------------------------------- tensors


def check_tensors(path: object, tensors: dict[str, Tensor]) -> None:
    """Names, dtypes and ranks of every tensor, before anything reads their shapes."""
    allowed = {f"{t}.{f}" for t in TOWERS for f in FACTORS} | set(KEY_TENSORS)
    unknown = sorted(n for n in tensors if n not in allowed and not n.startswith("train."))
    if unknown:
        shown_names = ", ".join(shown_name(n) for n in unknown[:5])
        raise ArtifactShapeError(f"{path}: unexpected tensors {shown_names}")
    for name, tensor in sorted(tensors.items()):
        if tensor.dtype not in FLOAT_DTYPES:
            raise ArtifactDtypeError(
                f"{path}: {shown_name(name)} has dtype {tensor.dtype}; artifacts hold float32, "
                "float16, bfloat16 or float64",
                _field(name),
            )
    for tower in TOWERS:
        for factor in FACTORS:
            name = f"{tower}.{factor}"
            factor_tensor = tensors.get(name)
            if factor_tensor is None:
                continue  # reported with the rest of the missing factors
            if factor_tensor.ndim != 3:
                raise ArtifactShapeError(
                    f"{path}: {name} must have 3 dimensions, "
                    f"got shape {tuple(factor_tensor.shape)}",
                    f"artifact.{name}",
                )
            shape = factor_tensor.shape
            dims = shape if factor.endswith("_u") else shape[::2]  # J, N | J, D
            if min(dims[:2]) < 1:
                raise ArtifactShapeError(
                    f"{path}: {name} is empty (shape {tuple(shape)})", f"artifact.{name}"
                )


def _field(name: str) -> str:
    return f"artifact.{name}" if name.replace(".", "").replace("_", "").isalnum() else "artifact"


def check_keys(path: object, keys: dict[str, Tensor], width: int | None) -> None:
    """Task keys: both modalities or neither; each [M, E] with usable, unit-norm rows.

    `width` is the backbone's embedding width E when known; else the two must agree.
    """
    if not keys:
        return
    if set(keys) != {"image", "text"}:
        missing = sorted({"image", "text"} - set(keys))
        raise ArtifactShapeError(
            f"{path}: task keys need keys.image and keys.text; keys.{missing[0]} is missing",
            f"artifact.keys.{missing[0]}",
        )
    for modality in ("image", "text"):
        centres = keys[modality]
        if centres.ndim == 2 and centres.shape[0] > MAX_CENTRES:
            raise ArtifactShapeError(
                f"{path}: keys.{modality} has {centres.shape[0]} centres (at most {MAX_CENTRES})",
                f"artifact.keys.{modality}",
            )
        try:
            check_centres(centres, width, f"keys.{modality}")
        except ValueError as err:
            raise ArtifactValueError(f"{path}: {err}", f"artifact.keys.{modality}") from None
        width = centres.shape[1]


def check_ranks(path: object, meta: dict, folded: FoldedTask) -> None:
    """Each tower's rank R' must be the header's and at most its width D: rank(U @ M) is at
    most min(N, D), so wider factors add nothing but work (closed-form folds use R + 1 columns,
    which may pass N, so N is no bound)."""
    for tower in TOWERS:
        key_u, key_m = getattr(folded, tower).key_u, getattr(folded, tower).key_m
        rank, width = key_u.shape[-1], key_m.shape[-1]  # [J, N, R'], [J, R', D]
        stated = meta.get(f"rank_{tower}", rank)
        if stated != rank:
            raise ArtifactShapeError(
                f"{path}: header field rank_{tower} is {stated}, but the {tower} factors have "
                f"rank {rank}",
                f"artifact.rank_{tower}",
            )
        if rank > width:
            raise ArtifactShapeError(
                f"{path}: the {tower} factors have rank {rank}, more than the width {width}",
                f"artifact.rank_{tower}",
            )


def check_prefix(path: object, folded: FoldedTask) -> None:
    """The prefix keys and values U @ M [J, N, D] each factor pair makes must stay bounded."""
    for tower in TOWERS:
        factors = getattr(folded, tower)
        for part in ("key", "value"):
            u, m = getattr(factors, f"{part}_u"), getattr(factors, f"{part}_m")
            if u.numel() == 0 or m.numel() == 0:
                continue  # R' = 0: no prefix at all
            largest = largest_prefix(u, m)
            if not largest <= PREFIX_LIMIT:
                worse = "u" if float(u.abs().max()) >= float(m.abs().max()) else "m"
                raise ArtifactValueError(
                    f"{path}: the {tower} prefix {part}s reach {largest:.3g} (at most "
                    f"{PREFIX_LIMIT:g}); the factors are not a trained prompt",
                    f"artifact.{tower}.{part}_{worse}",
                )


def largest_prefix(u: Tensor, m: Tensor, limit: float = PREFIX_LIMIT) -> float:
    """A bound on max |U @ M| over [J, N, D] (float64): at most `limit` when every entry is,
    else the largest entry of the first row block found past it (the search stops there).

    Why not the product: a header may claim [1024, 4096, D] from a few MiB of factors. Per
    layer, the bound max_n sum_r |u_nr| max_d |m_rd| (>= every |(U @ M)_nd|, cost N R')
    settles trained prompts; a layer it does not settle is multiplied out PREFIX_CHUNK
    elements at a time, so memory stays a few of those chunks whatever the shapes.
    """
    bound = 0.0
    for j in range(u.shape[0]):
        u_j, m_j = u[j].double(), m[j].double()  # [N, R'], [R', D]
        layer = float((u_j.abs() @ m_j.abs().amax(dim=1)).max())  # [N] -> its largest
        if layer <= limit:
            bound = max(bound, layer)
            continue
        rows = max(1, PREFIX_CHUNK // m_j.shape[1])
        for start in range(0, u_j.shape[0], rows):
            peak = float((u_j[start : start + rows] @ m_j).abs().max())  # [rows, D] at most
            if not peak <= limit:
                return peak
            bound = max(bound, peak)
    return bound
