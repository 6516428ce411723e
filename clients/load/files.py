"""Report files written atomically with ordinary permissions (0644 under the usual umask).

A temp file in the same folder, then `os.replace`, so a reader never sees half a report;
`tempfile` makes its files 0600, which would leave reports unreadable by anyone else on a
shared machine, so the mode is set to what `open()` would have given. The client stays free of
`lpi` (which has its own `lpi.atomic` for the server's files).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

MODE = 0o644


def atomic_write(path: Path, data: bytes, mode: int = MODE) -> None:
    """Write `data` to `path` in one step, with `mode` less the process umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, mode & ~umask)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
