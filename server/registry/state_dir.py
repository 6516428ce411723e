"""The registry's folder on disk: `registry.json`, the kept artifact copies, partial uploads.

One server process per folder (an exclusive lock, held for life). `registry.json` names, per
task, the active version and the kept copy of every loaded version; it is rewritten atomically
after every change, so after a crash it names the last versions that loaded successfully, each
a whole file. What a killed process left (partial uploads, temp files of atomic writes) is swept
when the folder is taken.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
from contextlib import suppress
from pathlib import Path

from lpi import atomic
from server.registry.errors import RegistryError

log = logging.getLogger("server.registry")

STATE_FILE = "registry.json"
STATE_FORMAT = 1


class StateDir:
    """`root`/registry.json, `root`/artifacts/<task>/<version>.safetensors, `root`/uploads."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.uploads = self.root / "uploads"
        (self.root / "artifacts").mkdir(parents=True, exist_ok=True)
        self._lock_file = None
        self._take()

    def artifact(self, task: str, version: str) -> Path:
        """Where the copy of a version is kept: named by the content hash `read_artifact`
        computed, never by anything read from a header."""
        return self.root / "artifacts" / task / f"{version}.safetensors"

    def keep_copy(self, task: str, version: str, source: Path) -> Path:
        """Copy an artifact under the folder (atomically), where restarts find it; always
        rewritten, so the copy is what the engine holds."""
        target = self.artifact(task, version)
        with atomic.atomic_path(target) as temp:
            shutil.copyfile(source, temp)
        return target

    def drop_copy(self, task: str, version: str) -> None:
        """Remove a kept copy (a load that failed after making it), and its task's folder if
        that is left empty."""
        target = self.artifact(task, version)
        target.unlink(missing_ok=True)
        with suppress(OSError):  # not empty: other versions of the task are kept there
            target.parent.rmdir()

    def save(self, tasks: dict[str, dict]) -> None:
        """Rewrite registry.json: task -> {"active": version, "versions": {version: file}}."""
        atomic.write_json(
            self.root / STATE_FILE, {"format": STATE_FORMAT, "tasks": tasks}, sort_keys=True
        )

    def read(self) -> dict[str, dict]:
        path = self.root / STATE_FILE
        if not path.exists():
            return {}
        data = json.loads(path.read_text())
        if data.get("format") != STATE_FORMAT:
            raise RegistryError(f"{STATE_FILE}: unknown registry format {data.get('format')!r}")
        return data["tasks"]

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def close(self) -> None:
        """Release the lock (the process's exit releases it too)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _take(self) -> None:
        """Lock the folder, then sweep what a killed process left."""
        self._lock_file = open(self.root / ".lock", "a+")  # noqa: SIM115 - held for life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise RegistryError(
                f"{self.root} is in use by another server process; give each its own data_dir"
            ) from None
        leftovers = [
            *self.uploads.glob("upload-*"),
            *self.root.glob(atomic.TEMP_GLOB),
            *(self.root / "artifacts").glob(f"*/{atomic.TEMP_GLOB}"),
        ]
        for path in leftovers:
            path.unlink(missing_ok=True)
        if leftovers:
            log.info("removed %d files left by an interrupted write", len(leftovers))
