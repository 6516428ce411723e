"""`python -m lpi`: embed texts and images with a backbone and, optionally, a random task.

A smoke run of the whole model path (load, tokenize, preprocess, prompts, prefix, encode).
With no arguments it builds the tiny preset, draws a synthetic image, and prints one JSON
object with the features' sizes, norms and image-text cosines, with and without a task.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import lpi

log = logging.getLogger("lpi")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lpi", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backbone",
        default="tiny",
        help="preset name (tiny, ViT-B-16, ...) or a local checkpoint path",
    )
    parser.add_argument(
        "--text",
        action="append",
        default=None,
        help="a text to embed (repeatable; default: two captions)",
    )
    parser.add_argument(
        "--image",
        action="append",
        type=Path,
        default=None,
        help="an image file to embed (repeatable; default: a drawn red square)",
    )
    parser.add_argument(
        "--prompt-layers",
        type=int,
        default=None,
        help="J of the random demo task (default: min(9, depth))",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def demo_image() -> Image.Image:
    image = Image.new("RGB", (96, 96), (240, 240, 240))
    ImageDraw.Draw(image).rectangle((24, 24, 72, 72), fill=(220, 30, 30))
    return image


def load_images(paths: list[Path] | None) -> list[Image.Image]:
    if not paths:
        return [demo_image()]
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.copy())
    return images


def run(args: argparse.Namespace) -> dict:
    backbone = lpi.load_backbone(args.backbone, seed=args.seed)
    texts = args.text or ["a red square on a grey background", "a blue circle"]
    tokens = lpi.tokenize(texts)
    pixels = lpi.preprocess(load_images(args.image), backbone.config.vision.image_size)
    depth = min(backbone.config.vision.layers, backbone.config.text.layers)
    torch.manual_seed(args.seed)
    config = lpi.PromptConfig(layers=args.prompt_layers or min(9, depth))
    bank = lpi.PromptBank()
    prompts = lpi.TaskPrompts.for_backbone(config, backbone)
    bank.add("demo", prompts)
    with torch.inference_mode():
        bare = backbone.encode_image(pixels), backbone.encode_text(tokens)
        image_prefix, _ = bank.prefixes(backbone, ["demo"] * len(pixels))
        _, text_prefix = bank.prefixes(backbone, ["demo"] * len(texts))
        prompted = (
            backbone.encode_image(pixels, image_prefix),
            backbone.encode_text(tokens, text_prefix),
        )
    return {
        "backbone": args.backbone,
        "fingerprint": lpi.fingerprint(backbone)[:16],
        "embed_dim": backbone.config.embed_dim,
        "texts": texts,
        "task_parameters": prompts.num_parameters(),
        "image_text_cosine": {
            "no_task": (bare[0] @ bare[1].T).tolist(),
            "random_task": (prompted[0] @ prompted[1].T).tolist(),
        },
        "feature_norms": [round(float(n), 6) for n in prompted[0].norm(dim=-1)],
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = parse_args(argv)
    try:
        result = run(args)
    except (ValueError, OSError) as err:
        log.error("smoke run failed: %s", err)
        return 2
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
