"""`python -m export onnx`: its options and what the subcommand does with them.

Argument parsing only: the export itself is `export.onnx_export.export_towers`, called through
its module so one place (the exporter) decides how graphs are made and checked. J and N, which
the onnx engine requires every served task to match exactly, come from what will be served
(`--run`, `--artifact`, `--demo`, or the demo bundle when `--backbone` is its backbone; see
`export.onnx_shape`), else from `--layers` / `--tokens`; the log says which.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import lpi
from export import onnx_export, onnx_shape
from export.onnx_runtime import MANIFEST, TOWERS
from export.onnx_shape import PromptShape, ShapeSourceError

log = logging.getLogger(__name__)

DEFAULT_LAYERS, DEFAULT_TOKENS = 9, 16  # with no source: the training CLI's own defaults


def onnx_parser() -> argparse.ArgumentParser:
    """The subcommand's parser, with its program name and description."""
    parser = argparse.ArgumentParser(
        prog="python -m export onnx",
        description="Export the image and text towers as ONNX graphs that take every prompted "
        "layer's prefix keys and values as inputs (one graph for every task and none). The "
        "onnx engine serves only tasks of the exported J and N: take them from what you will "
        "serve (--run, --artifact or --demo).",
    )
    return add_onnx_arguments(parser)


def add_onnx_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `python -m export onnx`."""
    parser.add_argument(
        "--backbone",
        metavar="PATH",
        help="checkpoint path or preset name (tiny, ViT-B-16, ...); default: the backbone "
        "--demo's bundle holds, or the one --run was trained with",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help=f"folder for image.onnx, text.onnx, *.fp16.onnx, *.int8.onnx and {MANIFEST}",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--run",
        type=Path,
        metavar="RUN",
        help="take J and N from this `python -m lpi.train` run folder (default: none)",
    )
    source.add_argument(
        "--artifact",
        type=Path,
        metavar="FILE",
        help="take J and N from this task artifact (default: none)",
    )
    source.add_argument(
        "--demo",
        type=Path,
        metavar="DIR",
        help="the server's demo bundle (DATA_DIR/demo, e.g. data/demo in a checkout): its "
        "backbone and its tasks' J and N (default: used when --backbone is its backbone)",
    )
    parser.add_argument(
        "--layers",
        type=_positive_int,
        default=None,
        metavar="J",
        help=f"prompted layers per tower (default: the source's, else {DEFAULT_LAYERS}, capped "
        "at the backbone's depth); must equal the source's when one is given",
    )
    parser.add_argument(
        "--tokens",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"prompt tokens (default: the source's, else {DEFAULT_TOKENS}); must equal the "
        "source's when one is given",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=onnx_export.DEFAULT_OPSET,
        help=f"ONNX opset (default {onnx_export.DEFAULT_OPSET}, at least {onnx_export.MIN_OPSET})",
    )
    parser.add_argument(
        "--no-fp16",
        action="store_true",
        help="skip the float16 graphs (by default kept where they hold cosine >= "
        f"{onnx_export.MIN_COSINE['float16']} per row against torch float32)",
    )
    parser.add_argument(
        "--exporter",
        choices=onnx_export.EXPORTERS,
        default="torchscript",
        help="torch.onnx exporter of the float32 (and int8) graphs (default: torchscript, whose "
        "graphs onnxruntime fuses and quantises best; float16 graphs always use dynamo)",
    )
    parser.add_argument(
        "--quantize",
        choices=onnx_export.QUANTIZE,
        default=None,
        help="also write *.int8.onnx (dynamic quantisation, int8 weights per channel), refused "
        f"unless it holds cosine >= {onnx_export.MIN_COSINE['int8']} per row against torch "
        "float32 on held-out inputs (default: none)",
    )
    return parser


def run_onnx(args: argparse.Namespace) -> int:
    """Export and check both towers; 0 done, 1 a float32 graph failed its check, 2 bad input."""
    try:
        shape = _source_shape(args)
        name = args.backbone or (shape.backbone if shape else None)
        if name is None:
            raise ShapeSourceError("--backbone: give the backbone to export (or --demo)")
        backbone = lpi.load_backbone(name)
        layers, tokens = _shape(args, shape, backbone)
    except (ShapeSourceError, lpi.CheckpointError) as err:
        log.error("%s", err)
        return 2
    try:
        manifest = onnx_export.export_towers(
            backbone,
            args.out,
            layers,
            tokens,
            args.opset,
            fp16=not args.no_fp16,
            quantize=args.quantize,
            exporter=args.exporter,
        )
    except onnx_export.OnnxExportError as err:
        log.error("%s", err)
        return 1
    except (ValueError, OSError) as err:
        log.error("%s", err)
        return 2
    kept = [entry["file"] for tower in TOWERS for entry in manifest["files"][tower].values()]
    log.info("exported %s to %s (J=%d, N=%d)", ", ".join(kept), args.out, layers, tokens)
    return 0


def _source_shape(args: argparse.Namespace) -> PromptShape | None:
    """The shape of what will be served: --run, --artifact, --demo, or the demo bundle the
    --backbone file belongs to; None when nothing says."""
    if args.run is not None:
        return onnx_shape.from_run(args.run)
    if args.artifact is not None:
        return onnx_shape.from_artifact(args.artifact)
    if args.demo is not None:
        return onnx_shape.from_demo(args.demo)
    root = onnx_shape.demo_root_of(args.backbone) if args.backbone else None
    return onnx_shape.from_demo(root) if root is not None else None


def _shape(
    args: argparse.Namespace, shape: PromptShape | None, backbone: lpi.Backbone
) -> tuple[int, int]:
    """(J, N) to export, checked against the source; logged with where they came from."""
    depth = min(backbone.config.vision.layers, backbone.config.text.layers)
    if shape is None:
        layers = min(args.layers or DEFAULT_LAYERS, depth)
        tokens = args.tokens or DEFAULT_TOKENS
        log.info(
            "J=%d, N=%d from %s (no --run, --artifact or --demo): only tasks of this shape "
            "will load into the onnx engine",
            layers,
            tokens,
            "--layers/--tokens" if args.layers or args.tokens else "the defaults",
        )
        return layers, tokens
    for flag, given, found in (
        ("--layers", args.layers, shape.layers),
        ("--tokens", args.tokens, shape.tokens),
    ):
        if given is not None and given != found:
            raise ShapeSourceError(
                f"{flag} {given} contradicts the {shape.source}, whose tasks have {found}: "
                f"drop {flag} (the onnx engine serves only tasks of the exported shape)"
            )
    if lpi.fingerprint(backbone) != shape.fingerprint:
        raise ShapeSourceError(
            f"the {shape.source} was made for backbone {shape.fingerprint[:12]}, not the one "
            "given: export with the backbone it was trained on"
        )
    log.info("J=%d, N=%d from the %s", shape.layers, shape.tokens, shape.source)
    return shape.layers, shape.tokens


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
