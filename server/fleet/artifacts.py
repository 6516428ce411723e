"""The fleet's artifact store: task artifacts by content (sha256 of the file), in one folder.

Every replica reads the same folder (a local directory on one machine, a shared mount on a
cluster). A catalog entry names an artifact by a URI relative to the store,
`sha256/<hex>.safetensors`; anything else (an absolute path, '..', another folder, a link out
of the store) is refused, so nothing in the catalog can make a replica read outside it. Files
are written atomically and never changed: a name is its content's digest.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

from lpi import atomic
from server.registry.errors import InvalidArtifactError

URI_PATTERN = re.compile(r"sha256/[0-9a-f]{64}\.safetensors")
CHUNK = 1 << 20


class ArtifactStoreError(InvalidArtifactError):
    """A URI that does not name a file of this store, or a file that is not what it names."""

    def __init__(self, message: str, field: str | None = "artifact") -> None:
        super().__init__(message, field)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactStore:
    """`root`/sha256/<hex>.safetensors, one immutable file per distinct artifact."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)

    def put(self, source: Path) -> str:
        """Copy `source` in (once: an existing name is already that content); its URI."""
        digest = file_digest(source)
        uri = f"sha256/{digest}.safetensors"
        target = self.root / uri
        if not target.exists():
            with atomic.atomic_path(target) as temp:
                shutil.copyfile(source, temp)
        return uri

    def check_uri(self, uri: object) -> str:
        """`uri` if it names a file inside this store; ArtifactStoreError otherwise."""
        if not isinstance(uri, str) or URI_PATTERN.fullmatch(uri) is None:
            raise ArtifactStoreError(
                f"artifact URI {str(uri)[:80]!r} is not sha256/<64 hex>.safetensors in the "
                "artifact store; refused"
            )
        base = self.root.resolve()
        if not (base / uri).resolve().is_relative_to(base):
            raise ArtifactStoreError(f"artifact URI {uri!r} leaves the artifact store; refused")
        return uri

    def path(self, uri: str) -> Path:
        """The local file of `uri`, checked against its name (a corrupt copy is refused)."""
        path = self.root / self.check_uri(uri)
        if not path.is_file():
            raise ArtifactStoreError(f"artifact {uri} is missing from the artifact store")
        if file_digest(path) != uri[len("sha256/") : -len(".safetensors")]:
            raise ArtifactStoreError(f"artifact {uri} does not match its digest (corrupt)")
        return path
