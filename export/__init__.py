"""export: versioned task-prompt artifacts (safetensors, checked on read) and ONNX towers.

`python -m export --help` lists the commands.
"""

from export.artifact import (
    ArtifactCorruptError,
    ArtifactError,
    ArtifactShapeError,
    ArtifactValueError,
    ArtifactVersionError,
    BackboneMismatchError,
    TaskArtifact,
    read_artifact,
    write_artifact,
)

__all__ = [
    "ArtifactCorruptError",
    "ArtifactError",
    "ArtifactShapeError",
    "ArtifactValueError",
    "ArtifactVersionError",
    "BackboneMismatchError",
    "TaskArtifact",
    "read_artifact",
    "write_artifact",
]
