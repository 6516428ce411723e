"""Where an ONNX export's prompt shape (J layers, N tokens) comes from.

The onnx engine serves only tasks of exactly the exported J and N, so an export should take
them from what it will serve: a training run (`run.json`), a task artifact (its header), or
the server's demo bundle (its artifacts). Each source also names the backbone it was made
for, by fingerprint, so an export against another backbone is refused before any graph is
traced. Nothing read from these files is used as a path except the demo bundle's own
backbone file, which must lie inside the bundle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from export.artifact import ArtifactError, read_artifact
from export.onnx_manifest import contained

DEMO_MANIFEST = "bundle.json"  # written by server.demo: format, recipe, backbone, artifacts
DEMO_FORMAT = "lpi-demo-bundle"


class ShapeSourceError(ValueError):
    """A run, artifact or demo bundle that cannot say which J and N to export."""


@dataclass(frozen=True)
class PromptShape:
    """J and N to export, what said so, and the backbone that source was made with."""

    layers: int  # J
    tokens: int  # N
    source: str  # for the log: "run runs/lpi", "artifact a.safetensors", "demo bundle data/demo"
    fingerprint: str  # lpi.fingerprint of the source's backbone
    backbone: str | None = None  # the backbone the source names, used when --backbone is absent


def from_run(run: Path) -> PromptShape:
    """J and N of a `python -m lpi.train` run (J already capped at the backbone's depth)."""
    from lpi.continual.run_state import RunError, load_state

    try:
        state = load_state(Path(run))
    except RunError as err:
        raise ShapeSourceError(str(err)) from err
    if state is None:
        raise ShapeSourceError(f"--run {run}: no run.json (not a `python -m lpi.train` folder)")
    prompt = state.config.prompt
    return PromptShape(
        int(prompt["layers"]),
        int(prompt["tokens"]),
        f"run {run}",
        state.config.backbone_fingerprint,
        state.config.backbone,
    )


def from_artifact(path: Path) -> PromptShape:
    """J and N of one task artifact (read and validated in full)."""
    try:
        artifact = read_artifact(path)
    except ArtifactError as err:
        raise ShapeSourceError(str(err)) from err
    meta = artifact.meta
    return PromptShape(
        int(meta["layers"]), int(meta["tokens"]), f"artifact {path}", meta["backbone_fingerprint"]
    )


def from_demo(root: Path) -> PromptShape:
    """J and N of the demo bundle's tasks (all of them must agree), and its backbone."""
    manifest = _demo_manifest(root)
    if manifest is None:
        raise ShapeSourceError(
            f"--demo {root}: no demo bundle ({DEMO_MANIFEST} missing or not a demo bundle); "
            "start `python -m server` once to build it, or pass the data directory's demo/"
        )
    try:
        backbone = _inside(root, manifest["backbone"])
        shapes = {from_artifact(_inside(root, f)) for f in manifest["artifacts"].values()}
    except (KeyError, TypeError, AttributeError) as err:
        raise ShapeSourceError(f"{root / DEMO_MANIFEST}: malformed ({err!r})") from err
    found = {(s.layers, s.tokens, s.fingerprint) for s in shapes}
    if len(found) != 1:
        raise ShapeSourceError(f"--demo {root}: its tasks disagree on (J, N, backbone): {found}")
    layers, tokens, fingerprint = found.pop()
    return PromptShape(layers, tokens, f"demo bundle {root}", fingerprint, str(backbone))


def demo_root_of(backbone: str) -> Path | None:
    """The demo bundle a backbone file belongs to (ROOT/demo-XXXX/backbone.safetensors), or
    None when it is not the backbone a bundle's manifest names."""
    path = Path(backbone)
    if not path.is_file():
        return None
    root = path.resolve().parent.parent
    manifest = _demo_manifest(root)
    if manifest is None or not isinstance(manifest.get("backbone"), str):
        return None
    return root if (root / manifest["backbone"]).resolve() == path.resolve() else None


def _demo_manifest(root: Path) -> dict | None:
    try:
        manifest = json.loads((Path(root) / DEMO_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    is_demo = isinstance(manifest, dict) and manifest.get("format") == DEMO_FORMAT
    return manifest if is_demo else None


def _inside(root: Path, relative: str) -> Path:
    """A file the bundle lists, refused if it would lead out of the bundle."""
    path = contained(Path(root), relative)
    if path is None:
        raise ShapeSourceError(f"{root / DEMO_MANIFEST}: lists {relative!r}, outside the bundle")
    return path
