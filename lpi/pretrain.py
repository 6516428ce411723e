"""`python -m lpi.pretrain`: train a small CLIP from scratch, the demo's frozen backbone.

A thin command line over `lpi.continual.pretraining.run_pretraining`: the flags fill a
`PretrainConfig`. No pretrained CLIP weights can be had offline, so tests and the demo
pretrain one on the synthetic captioned images; real users skip this and point `lpi.train` at
a real checkpoint. The result is one safetensors file with its architecture.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from lpi.continual.flags import DefaultsHelp, add_optimiser_flags, default_of
from lpi.continual.pretraining import PretrainConfig, run_pretraining

log = logging.getLogger("lpi.pretrain")


def parse_args(argv: list[str] | None = None) -> PretrainConfig:
    """The flags as a `PretrainConfig` (argparse exits with status 2 on a bad flag)."""

    def default(name: str) -> Any:
        return default_of(PretrainConfig, name)

    parser = argparse.ArgumentParser(
        prog="python -m lpi.pretrain",
        description=__doc__.split("\n")[0],
        formatter_class=DefaultsHelp,
    )
    parser.add_argument("--manifest", type=Path, required=True, help="JSONL manifest of the data")
    parser.add_argument("--split", default=default("split"), help="records of this split")
    parser.add_argument("--preset", default=default("preset"), help="architecture preset")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    add_optimiser_flags(parser, PretrainConfig, epochs="epochs")
    parser.add_argument("--seed", type=int, default=default("seed"), help="of init and data order")
    parser.add_argument("--device", default=default("device"), help="torch device")
    parser.add_argument(
        "--compact-vocabulary",
        action=argparse.BooleanOptionalAction,
        default=default("compact_vocabulary"),
        help="step only the token embedding rows the captions use (the same model, faster)",
    )
    return PretrainConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = parse_args(argv)
    try:
        result = run_pretraining(config)
    except (ValueError, OSError) as err:
        log.error("%s", err)
        return 2
    log.info(
        "pretrained %s on %d images in %.0f s: loss %.3f -> %.3f, saved %s",
        config.preset,
        result.images,
        result.seconds,
        result.history[0],
        result.history[-1],
        result.path,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
