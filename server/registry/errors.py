"""The registry's refusals: what went wrong and, in `field`, the request field at fault.

No HTTP status here: `server.errors` maps each class to one.
"""

from __future__ import annotations

from wire.schema import is_task_name


class RegistryError(Exception):
    """Base of the registry's refusals; as such, a conflict with the registry's state (a full
    slot pool, a state directory in use)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidTaskNameError(RegistryError):
    """A task name that is not one (`wire.schema.is_task_name`): names become folder names."""


def check_task_name(task: object) -> str:
    """`task`, or InvalidTaskNameError: every name the registry keeps becomes a folder name, so
    names from registry.json or a bundle's manifest are checked as strictly as a request's."""
    if not is_task_name(task):
        raise InvalidTaskNameError(f"{task!r} is not a task name", field="task")
    return task  # type: ignore[return-value]  # is_task_name checked it is a str


class TaskNotLoadedError(RegistryError):
    """No such task is loaded (or it is being unloaded)."""


class VersionNotLoadedError(RegistryError):
    """The task is loaded, this prompt version of it is not."""


class VersionNotIndexedError(RegistryError):
    """Promoting this version would leave /search without vectors while the serving version
    has some; the caller may force it."""


class TaskBusyError(RegistryError):
    """An unload found requests still holding the task after its drain timeout; nothing was
    unloaded."""


class InvalidArtifactError(RegistryError):
    """An artifact the engine cannot hold (its shape does not fit the pool or the ONNX export),
    or a kept copy that no longer matches its name."""
