"""Atomic file writes, one way for the whole project: readers never see half a file.

A writer fills a temp file beside the target (same folder, so the rename stays on one file
system), it is fsynced, then `os.replace` puts it in place; on any error the temp file is
removed. A process killed mid-write can leave a temp file `.NAME.*.tmp`, never a torn target.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP_GLOB = ".*.tmp"  # what a killed writer may leave behind (for sweeps)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write `path` through; it replaces `path` when the block ends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temp = Path(name)
    try:
        yield temp
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: object, **options: Any) -> Path:
    """JSON, indented by 2 unless `options` say otherwise, with a final newline."""
    return write_text(path, json.dumps(data, **({"indent": 2} | options)) + "\n")
