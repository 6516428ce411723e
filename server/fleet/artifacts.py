"""The fleet's artifact store: task artifacts by content (sha256 of the file), shared by replicas.

The store is a location every replica reads: a directory (a local folder on one machine, a
shared mount on a cluster; a plain path or `file://`), or object storage through fsspec
(`s3://bucket/prefix`, `gs://...`, `az://...`, `memory://` for tests; the `fleet` extra ships
fsspec, each cloud's package is the operator's: s3fs, gcsfs, adlfs). A catalog entry names an
artifact by a URI relative to the store, `sha256/<hex>.safetensors`; anything else (an absolute
path, '..', another folder, a link out of the store) is refused, so nothing in the catalog can
make a replica read outside it.

Writes are atomic and objects never change: a name is its content's digest, computed here from
the bytes actually written. A directory gets a temporary file then `os.replace` (`lpi.atomic`);
object storage gets a temporary object under `tmp/` then a move to the final key (a server-side
copy on S3 and GCS: the final key appears whole or not at all). Reads are checked against the
name: a local file on every read, a remote object while it is downloaded into the replica's
cache (`cache_dir`), so a corrupt or truncated object never reaches the engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import IO

from lpi import atomic
from server.registry.errors import InvalidArtifactError

URI_PATTERN = re.compile(r"sha256/[0-9a-f]{64}\.safetensors")
CHUNK = 1 << 20
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # the server's default --max-artifact-bytes
TEMP_PREFIX = "tmp"  # object storage: where an interrupted upload may leave a `.part` object


class ArtifactStoreError(InvalidArtifactError):
    """A URI that does not name a file of this store, or a file that is not what it names."""

    def __init__(self, message: str, field: str | None = "artifact") -> None:
        super().__init__(message, field)


def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return _copy_hashing(handle, None)


def _copy_hashing(source: IO[bytes], target: IO[bytes] | None, limit: int | None = None) -> str:
    """Read `source` to its end (into `target` if given); its sha256. Past `limit` bytes:
    ArtifactStoreError (a hostile object must not fill the disk)."""
    digest, size = hashlib.sha256(), 0
    while chunk := source.read(CHUNK):
        size += len(chunk)
        if limit is not None and size > limit:
            raise ArtifactStoreError(f"artifact is larger than {limit} bytes; refused")
        digest.update(chunk)
        if target is not None:
            target.write(chunk)
    return digest.hexdigest()


def split_location(location: str | Path) -> tuple[str, str]:
    """(protocol, path): ("file", folder) for a path or file:// URL, else the URL's own."""
    if isinstance(location, Path) or "://" not in str(location):
        return "file", str(location)
    protocol, _, rest = str(location).partition("://")
    if protocol == "file":
        return "file", rest
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", protocol):
        raise ValueError(f"artifact store {location!r}: {protocol!r} is not a URL scheme")
    return protocol, rest.strip("/")


def filesystem(location: str):
    """The fsspec filesystem class for an object-storage `location`; a ValueError that names
    the package to install when fsspec, or the package of the URL's scheme, is missing."""
    protocol, path = split_location(location)
    try:
        import fsspec
        from fsspec.registry import known_implementations
    except ImportError:
        raise ValueError(
            f"artifact store {location!r} needs the fsspec package: pip install "
            "'lpi-serve[fleet]' (or pip install fsspec)"
        ) from None
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except ImportError:
        package = known_implementations[protocol]["class"].split(".")[0]
        raise ValueError(
            f"artifact store {location!r} needs the {package} package for {protocol}:// "
            f"(pip install {package})"
        ) from None
    except ValueError:
        raise ValueError(
            f"artifact store {location!r}: fsspec knows no filesystem for {protocol}://"
        ) from None
    if not path and protocol != "memory":
        raise ValueError(f"artifact store {location!r} names no bucket or folder")
    return cls


class ArtifactStore:
    """`location`/sha256/<hex>.safetensors, one immutable file per distinct artifact.

    `root` is the local folder of a directory store (None for object storage); `cache_dir`
    is where a replica keeps the verified copies of remote objects it loads (default: a
    temporary folder of this process)."""

    def __init__(
        self,
        location: str | Path,
        cache_dir: Path | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        protocol, path = split_location(location)
        self.max_bytes = max_bytes
        self.root: Path | None = None
        self.url = str(location)
        if protocol == "file":
            self.root = Path(path)
            (self.root / "sha256").mkdir(parents=True, exist_ok=True)
            return
        self.fs = filesystem(self.url)()  # credentials: the filesystem's own (env, config)
        self.base = f"{protocol}://{path}" if path else f"{protocol}://"
        self.cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="lpi-artifact-cache-"))

    def put(self, source: Path) -> str:
        """Copy `source` in (once: an existing name is already that content); its URI."""
        digest = file_digest(source)
        uri = f"sha256/{digest}.safetensors"
        if self.root is None:
            return self._upload(source, uri)
        target = self.root / uri
        if target.is_file() and file_digest(target) == digest:
            return uri
        with atomic.atomic_path(target) as temp:  # a corrupt copy is replaced, never torn
            shutil.copyfile(source, temp)
            if file_digest(temp) != digest:
                raise ArtifactStoreError(f"{source.name} changed while it was copied; retry")
        return uri

    def check_uri(self, uri: object) -> str:
        """`uri` if it names a file inside this store; ArtifactStoreError otherwise."""
        if not isinstance(uri, str) or URI_PATTERN.fullmatch(uri) is None:
            raise ArtifactStoreError(
                f"artifact URI {str(uri)[:80]!r} is not sha256/<64 hex>.safetensors in the "
                "artifact store; refused"
            )
        if self.root is not None:  # a key of object storage cannot be a link
            base = self.root.resolve()
            if not (base / uri).resolve().is_relative_to(base):
                raise ArtifactStoreError(f"artifact URI {uri!r} leaves the artifact store; refused")
        return uri

    def path(self, uri: str) -> Path:
        """The local file of `uri`, checked against its name (a corrupt copy is refused)."""
        digest = self.check_uri(uri)[len("sha256/") : -len(".safetensors")]
        if self.root is None:
            return self._download(uri, digest)
        path = self.root / uri
        if not path.is_file():
            raise ArtifactStoreError(f"artifact {uri} is missing from the artifact store")
        if file_digest(path) != digest:
            raise ArtifactStoreError(f"artifact {uri} does not match its digest (corrupt)")
        return path

    # -- object storage ---------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return f"{self.base.rstrip('/')}/{name}"

    def _upload(self, source: Path, uri: str) -> str:
        final = self._key(uri)
        if self._remote(lambda: self.fs.exists(final), uri) and self._intact(final, uri):
            return uri  # written whole by whoever was first; a damaged object is written again
        temp = self._key(f"{TEMP_PREFIX}/{uuid.uuid4().hex}.part")

        def write() -> str:
            with open(source, "rb") as handle, self.fs.open(temp, "wb") as out:
                return _copy_hashing(handle, out)

        try:
            if f"sha256/{self._remote(write, uri)}.safetensors" != uri:
                raise ArtifactStoreError(f"{source.name} changed while it was copied; retry")
            self._remote(lambda: self.fs.mv(temp, final), uri)
        finally:
            with contextlib.suppress(Exception):  # best effort: tmp/ holds only leftovers
                if self.fs.exists(temp):
                    self.fs.rm(temp)
        return uri

    def _intact(self, key: str, uri: str) -> bool:
        """Whether the remote object itself (not this replica's cached copy) matches its name,
        hashed as it streams (over `max_bytes`: not intact)."""

        def digest() -> str:
            with self.fs.open(key, "rb") as handle:
                return _copy_hashing(handle, None, self.max_bytes)

        try:
            return f"sha256/{self._remote(digest, uri)}.safetensors" == uri
        except ArtifactStoreError:
            return False

    def _download(self, uri: str, digest: str) -> Path:
        local = self.cache_dir / uri
        if local.is_file() and file_digest(local) == digest:
            return local
        with atomic.atomic_path(local) as temp, open(temp, "wb") as out:
            try:
                handle = self.fs.open(self._key(uri), "rb")
            except FileNotFoundError:
                raise ArtifactStoreError(
                    f"artifact {uri} is missing from the artifact store"
                ) from None
            except Exception as err:  # the backend's own errors (botocore, google.auth, ...)
                raise ArtifactStoreError(f"cannot read artifact {uri}: {err}") from None
            with handle:
                got = self._remote(lambda: _copy_hashing(handle, out, self.max_bytes), uri)
            if got != digest:
                raise ArtifactStoreError(f"artifact {uri} does not match its digest (corrupt)")
        return local

    def _remote(self, call, uri: str):
        """`call()`, a backend's error (any type: each cloud has its own) as ours."""
        try:
            return call()
        except ArtifactStoreError:
            raise
        except Exception as err:
            raise ArtifactStoreError(f"artifact store {self.url}, {uri}: {err}") from None
