"""Task prompt versions at runtime: which serve, who holds them, what survives a restart.

- `versions`: the in-memory table of tasks, their active and serving versions, and pins;
- `state_dir`: the folder on disk (`registry.json`, kept artifact copies, uploads);
- `restore`: bringing `registry.json`'s versions back at start;
- `manager`: `TaskRegistry`, composing them with the engine and the store (load, promote,
  unload), one admin change at a time;
- `errors`: the registry's refusals, each naming its field.
"""

from __future__ import annotations

from server.registry.errors import (
    InvalidArtifactError,
    RegistryError,
    TaskBusyError,
    TaskNotLoadedError,
    VersionNotIndexedError,
    VersionNotLoadedError,
)
from server.registry.manager import TaskRegistry
from server.registry.state_dir import STATE_FILE

__all__ = [
    "STATE_FILE",
    "InvalidArtifactError",
    "RegistryError",
    "TaskBusyError",
    "TaskNotLoadedError",
    "TaskRegistry",
    "VersionNotIndexedError",
    "VersionNotLoadedError",
]
