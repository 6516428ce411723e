"""What an ONNX export's `onnx.json` must hold before the runtime reads anything from it.

Why a module of its own: the manifest names the graph files to load and the shapes to feed,
and a folder may come from anywhere. Every value the runtime reads is type-checked here, and
a file entry must be a plain name inside the export folder (its sha256 comes from the same
manifest, so it cannot vouch for a file elsewhere). The checks return what is wrong, or None;
`export.onnx_runtime` raises its OnnxManifestError with it. Nothing here touches the disk but
`contained`, which resolves a name to check where it leads.
"""

from __future__ import annotations

import re
from pathlib import Path

TOWERS = ("image", "text")
# Top-level integers the runtime feeds or compares, each at least 1.
COUNTS = ("layers", "tokens", "image_size", "context_length", "vocab_size")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def manifest_problem(manifest: object) -> str | None:
    """The first thing wrong with a manifest's shape, or None when the runtime can read it."""
    if not isinstance(manifest, dict):
        return f"the manifest must be a JSON object, got {type(manifest).__name__}"
    backbone = manifest.get("backbone")
    if not isinstance(backbone, dict) or not isinstance(backbone.get("fingerprint"), str):
        return "backbone.fingerprint must be a string"
    for name in COUNTS:
        if not _count(manifest.get(name)):
            return f"{name} must be a positive integer, got {_shown(manifest.get(name))}"
    widths = manifest.get("widths")
    if not isinstance(widths, dict) or not all(_count(widths.get(t)) for t in TOWERS):
        return "widths must hold a positive integer per tower (image, text)"
    return _files_problem(manifest.get("files")) or _checks_problem(manifest.get("checks"))


def _files_problem(files: object) -> str | None:
    if not isinstance(files, dict):
        return "files must be an object of towers"
    for tower in TOWERS:
        entries = files.get(tower)
        if not isinstance(entries, dict):
            return f"files.{tower} must be an object of precisions"
        for precision, entry in entries.items():
            where = f"files.{tower}.{_shown(precision)}"
            if not isinstance(entry, dict):
                return f"{where} must be an object with file and sha256"
            if not is_plain_name(entry.get("file")):
                return f"{where}.file must be a plain file name, got {_shown(entry.get('file'))}"
            if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
                return f"{where}.sha256 must be 64 lowercase hex digits"
    return None


def _checks_problem(checks: object) -> str | None:
    if not isinstance(checks, dict) or not all(
        isinstance(checks.get(t, {}), dict)
        and all(isinstance(v, dict) for v in checks.get(t, {}).values())
        for t in TOWERS
    ):
        return "checks must be an object of towers, each an object of precisions"
    return None


def is_plain_name(name: object) -> bool:
    """A file name with no folder part: not empty, no separator, not '.' or '..', no NUL."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 255
        and name not in (".", "..")
        and not any(c in name for c in "/\\\0")
        and ":" not in name  # a drive ("C:x") or an NTFS stream on Windows
    )


def contained(directory: Path, name: str) -> Path | None:
    """`directory / name` when it resolves inside `directory` (symlinks followed), else None."""
    path = directory / name
    root = directory.resolve()
    try:
        target = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return None
    return path if target.is_relative_to(root) and target != root else None


def _count(value: object) -> bool:
    return type(value) is int and value >= 1


def _shown(value: object) -> str:
    text = ascii(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
