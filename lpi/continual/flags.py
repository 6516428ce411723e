"""What the pipeline's command lines share: help that shows every default, read from the
config dataclass the flags fill, so a CLI's defaults cannot drift from the API's."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` with "(default: ...)" on every optional flag, but not on required ones."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required:
            return action.help or ""
        return super()._get_help_string(action) or ""


def default_of(config_class: type, name: str) -> Any:
    """The default of field `name` of a dataclass (its factory's value if it has one)."""
    for field in dataclasses.fields(config_class):
        if field.name == name:
            if field.default_factory is not dataclasses.MISSING:
                return field.default_factory()
            if field.default is dataclasses.MISSING:
                raise ValueError(f"{config_class.__name__}.{name} has no default")
            return field.default
    raise AttributeError(f"{config_class.__name__} has no field {name!r}")
