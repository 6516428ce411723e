"""Why an artifact cannot be served: one exception per failed check, each naming its field.

`field` is what a server reports to the client: "artifact" for the file as a whole (unreadable,
corrupt, another backbone), "artifact.<header field>" or "artifact.<tensor>" when one header
field or one tensor is at fault, "path" when the file could not be reached at all.
"""

from __future__ import annotations


class ArtifactError(ValueError):
    """A task artifact that cannot be served; the subclass says which check failed."""

    def __init__(self, message: str, field: str = "artifact") -> None:
        super().__init__(message)
        self.field = field


class ArtifactCorruptError(ArtifactError):
    """Unreadable, truncated, or its bytes do not match the recorded checksum."""


class ArtifactVersionError(ArtifactError):
    """Written in a format version this code does not read."""


class ArtifactHeaderError(ArtifactError):
    """A header field of the wrong type, out of range, or text that is not UTF-8."""


class PromptVersionError(ArtifactError):
    """The header names a prompt version that is not its tensors' content hash."""


class ArtifactShapeError(ArtifactError):
    """Missing tensors, unexpected tensors, or shapes that do not fit together."""


class ArtifactDtypeError(ArtifactError):
    """A tensor of a dtype the model cannot use (integers, booleans, complex, 8-bit floats)."""


class ArtifactValueError(ArtifactError):
    """NaN or Inf among the values, or values no encoder can use (prefixes too large, task
    keys without a direction)."""


class BackboneMismatchError(ArtifactError):
    """Made for another backbone: its vectors would not be comparable."""
