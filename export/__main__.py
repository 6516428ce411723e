"""`python -m export`: task-prompt artifacts from a training run, ONNX towers, dense imports.

python -m export RUN --backbone PATH --out DIR [--task NAME ...]
python -m export onnx --backbone PATH --out DIR
python -m export import-dense PROMPTS --backbone PATH --name TASK --out DIR
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from export.artifact import ArtifactError
from lpi import load_backbone

log = logging.getLogger("export")


def tasks_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a run's tasks as versioned artifacts (one .safetensors per task "
        "and an index.json). Subcommands: 'onnx' (the towers as ONNX graphs) and "
        "'import-dense' (prompts trained elsewhere); each has --help.",
    )
    parser.add_argument("run", type=Path, help="run folder written by python -m lpi.train")
    parser.add_argument("--backbone", required=True, help="the run's backbone (path or preset)")
    parser.add_argument("--out", type=Path, required=True, help="artifact folder")
    parser.add_argument("--task", action="append", help="export only this task (repeatable)")
    return parser


def import_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export import-dense",
        description="Turn dense prompts trained elsewhere into a task artifact.",
    )
    parser.add_argument(
        "prompts", type=Path, help=".safetensors/.pt with prompts_v/prompts_t or image.{j}/text.{j}"
    )
    parser.add_argument("--backbone", required=True, help="the backbone the prompts fit (path)")
    parser.add_argument("--name", required=True, help="task name")
    parser.add_argument("--out", type=Path, required=True, help="artifact folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["onnx"]:
            from export.onnx_cli import onnx_parser, run_onnx

            return run_onnx(onnx_parser().parse_args(argv[1:]))
        if argv[:1] == ["import-dense"]:
            args = import_parser().parse_args(argv[1:])
            from export.importer import import_dense

            artifact = import_dense(args.prompts, load_backbone(args.backbone), args.name, args.out)
            log.info("imported %s as %s", artifact.name, artifact.path)
            return 0
        args = tasks_parser().parse_args(argv)
        from export.tasks import export_run

        artifacts = export_run(args.run, load_backbone(args.backbone), args.out, args.task)
        log.info("exported %d tasks to %s", len(artifacts), args.out)
        return 0
    except (ArtifactError, ValueError, OSError) as err:
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
