"""What the pipeline's command lines share: help that shows every default, read from the
config dataclass the flags fill, so a CLI's defaults cannot drift from the API's."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from lpi.continual.methods import DENSE_LR, LPI_LR


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` with "(default: ...)" on every optional flag, but not on required ones."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required:
            return action.help or ""
        return super()._get_help_string(action) or ""


def add_optimiser_flags(
    parser: argparse.ArgumentParser, config_class: type, epochs: str, lr: bool = True
) -> None:
    """The flags pretraining and training share (epochs, batch, AdamW, data workers), with the
    defaults of `config_class`; `epochs` is the help text of --epochs; `lr=False` leaves --lr
    out (a learning-rate sweep takes its own list)."""

    def default(name: str) -> Any:
        return default_of(config_class, name)

    parser.add_argument("--epochs", type=int, default=default("epochs"), help=epochs)
    parser.add_argument("--batch-size", type=int, default=default("batch_size"), help="batch size")
    if lr:
        peak = default("lr")
        about = "peak learning rate" + (
            f"; None: the best the bench sweep found for the method ({LPI_LR:g} for LPI, its "
            f"ablations and the shared prompt, {DENSE_LR:g} for dense)"
            if peak is None
            else ""
        )
        parser.add_argument("--lr", type=float, default=peak, help=about)
    parser.add_argument(
        "--weight-decay", type=float, default=default("weight_decay"), help="AdamW weight decay"
    )
    parser.add_argument(
        "--workers", type=int, default=default("workers"), help="data loader worker processes"
    )


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
