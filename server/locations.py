"""Where the server keeps its runtime files when `--data-dir` is not given.

Inside a checkout of this repository (the working directory or a folder above it holds the
project's `pyproject.toml`) it is the checkout's `data/`, which `.gitignore` lists, so the
README's commands keep everything in one place. Anywhere else it is a per-user data folder
(the XDG base directory convention: `$XDG_DATA_HOME/lpi-serve`, else
`~/.local/share/lpi-serve`), so a server started from an arbitrary folder never scatters a
`data/` there. Standard library only: settings are parsed before anything heavy is imported.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

APP = "lpi-serve"  # the project's name in pyproject.toml and the per-user folder's name


@dataclass(frozen=True)
class DataHome:
    """A default data directory and why it was chosen (logged at start, shown on /readyz)."""

    path: Path
    reason: str


def default_data_home(cwd: Path | None = None, env: dict[str, str] | None = None) -> DataHome:
    """The checkout's data/ when `cwd` lies inside one, else the per-user data folder."""
    cwd = Path.cwd() if cwd is None else cwd
    env = os.environ if env is None else env
    checkout = find_checkout(cwd)
    if checkout is not None:
        return DataHome(checkout / "data", f"inside the repository checkout {checkout}")
    return DataHome(user_data_dir(env), "the per-user data folder (outside a checkout)")


def default_data_dir() -> Path:
    return default_data_home().path


def find_checkout(start: Path) -> Path | None:
    """The nearest folder at or above `start` whose pyproject.toml names this project."""
    for folder in (start.absolute(), *start.absolute().parents):
        if _names_project(folder / "pyproject.toml"):
            return folder
    return None


def user_data_dir(env: dict[str, str] | os._Environ) -> Path:
    """$XDG_DATA_HOME/lpi-serve (an absolute XDG_DATA_HOME only, as the spec says), else
    ~/.local/share/lpi-serve."""
    base = env.get("XDG_DATA_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "share"
    return root / APP


def _names_project(pyproject: Path) -> bool:
    try:
        with open(pyproject, "rb") as handle:
            return tomllib.load(handle).get("project", {}).get("name") == APP
    except (OSError, tomllib.TOMLDecodeError):
        return False
