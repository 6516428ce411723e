"""`python -m lpi.pretrain`: train a small CLIP from scratch, the demo's frozen backbone.

No pretrained CLIP weights can be had offline, so tests and the demo pretrain one on the
synthetic captioned images (`python -m lpi.continual.data.synthetic`). Real users skip this
and point `lpi.train` at a real checkpoint. The result is one safetensors file with its
architecture.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lpi.backbone import Backbone
from lpi.checkpoint import save_backbone
from lpi.config import load_preset
from lpi.continual import losses
from lpi.continual.data.loader import make_loader
from lpi.continual.data.manifest import read_manifest, select
from lpi.continual.methods import make_optimizer

log = logging.getLogger("lpi.pretrain")
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lpi.pretrain", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--manifest", type=Path, required=True, help="JSONL manifest of the data")
    parser.add_argument("--split", default="train", help="records of this split (default: train)")
    parser.add_argument("--preset", default="tiny", help="architecture preset (default: tiny)")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def pretrain(
    backbone: Backbone,
    loader,
    epochs: int,
    lr: float,
    weight_decay: float,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Contrastive training of every backbone weight; returns the mean loss of each epoch."""
    backbone.to(device).train().requires_grad_(True)
    decay = [p for n, p in backbone.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in backbone.named_parameters() if p.dim() < 2 or "embedding" in n]
    groups = [{"params": decay}, {"params": rest, "weight_decay": 0.0}]
    optimizer, scheduler = make_optimizer(groups, lr, weight_decay, epochs * len(loader))
    history = []
    for epoch in range(epochs):
        total, count = 0.0, 0
        for batch in tqdm(loader, desc=f"pretrain {epoch + 1}/{epochs}", leave=False):
            image = backbone.encode_image(batch.pixels.to(device))
            text = backbone.encode_text(batch.tokens.to(device))
            loss = losses.clip_loss(image, text, backbone.logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                backbone.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            total, count = (
                total + float(loss.detach()) * len(batch.pixels),
                count + len(batch.pixels),
            )
        history.append(total / count)
        log.info("epoch %d/%d loss %.4f", epoch + 1, epochs, history[-1])
    backbone.eval().requires_grad_(False)
    return history


def pretrain_preset(
    records, preset: str, out: Path, epochs: int, lr: float, weight_decay: float,
    batch_size: int, seed: int, device: str, workers: int = 0,
) -> list[float]:  # fmt: skip
    """A new backbone of `preset`, pretrained on `records` and saved to `out`; the loss per
    epoch. The whole job of `python -m lpi.pretrain`, for callers that are not a CLI."""
    torch.manual_seed(seed)
    backbone = Backbone(load_preset(preset))
    loader = make_loader(
        records, backbone.config.vision.image_size, batch_size, shuffle=True, seed=seed,
        num_workers=workers, cache=True, drop_last=True,
    )  # fmt: skip
    history = pretrain(backbone, loader, epochs, lr, weight_decay, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_backbone(backbone.cpu(), out)
    return history


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = parse_args(argv)
    records = select(read_manifest(args.manifest), split=args.split)
    if not records:
        log.error("%s has no records of split %r", args.manifest, args.split)
        return 2
    start = time.perf_counter()
    history = pretrain_preset(
        records, args.preset, args.out, args.epochs, args.lr, args.weight_decay,
        args.batch_size, args.seed, args.device, args.workers,
    )  # fmt: skip
    log.info(
        "pretrained %s on %d images in %.0f s: loss %.3f -> %.3f, saved %s",
        args.preset,
        len(records),
        time.perf_counter() - start,
        history[0],
        history[-1],
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
