"""Training a small CLIP from scratch: `run_pretraining(config)`, the demo's frozen backbone.

No pretrained CLIP weights can be had offline, so tests and the demo pretrain one on the
synthetic captioned images (`python -m lpi.continual.data.synthetic`). Real users skip this
and point training at a real checkpoint. The result is one safetensors file with its
architecture. `python -m lpi.pretrain` is its CLI.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from lpi.backbone import Backbone
from lpi.checkpoint import save_backbone
from lpi.config import load_preset
from lpi.continual import losses
from lpi.continual.control import NO_CONTROL, Control
from lpi.continual.data.loader import Batch, make_loader
from lpi.continual.data.manifest import read_manifest, select
from lpi.continual.methods import make_optimizer
from lpi.continual.trainer import default_device

log = logging.getLogger("lpi.pretrain")
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 100


@dataclass(frozen=True)
class PretrainConfig:
    """A new backbone of `preset`, trained contrastively on one split of a manifest."""

    manifest: Path  # JSONL manifest of the data
    out: Path  # output .safetensors file
    split: str = "train"  # records of this split
    preset: str = "tiny"  # architecture preset (lpi/presets)
    epochs: int = 30
    batch_size: int = 128  # CLIP's loss wants many negatives per batch
    lr: float = 2e-3
    weight_decay: float = 0.1
    workers: int = 0  # data loader worker processes
    seed: int = 0
    device: str = dataclasses.field(default_factory=default_device)

    def __post_init__(self) -> None:
        object.__setattr__(self, "manifest", Path(self.manifest))
        object.__setattr__(self, "out", Path(self.out))


@dataclass(frozen=True)
class Pretrained:
    """What a pretraining run made: the file, the mean loss of each epoch, its data, its time."""

    path: Path
    history: list[float]
    images: int
    seconds: float


def pretrain(
    backbone: Backbone,
    loader: DataLoader[Batch],
    epochs: int,
    lr: float,
    weight_decay: float,
    device: torch.device | str = "cpu",
    control: Control = NO_CONTROL,
) -> list[float]:
    """Contrastive training of every backbone weight; returns the mean loss of each epoch."""
    backbone.to(device).train().requires_grad_(True)
    decay = [p for n, p in backbone.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in backbone.named_parameters() if p.dim() < 2 or "embedding" in n]
    groups: list[dict[str, Any]] = [{"params": decay}, {"params": rest, "weight_decay": 0.0}]
    steps = epochs * len(loader)
    optimizer, scheduler = make_optimizer(groups, lr, weight_decay, steps)
    history = []
    for epoch in range(epochs):
        total, count = 0.0, 0
        part = control.part(epoch / epochs, (epoch + 1) / epochs, f"(epoch {epoch + 1}/{epochs})")
        for step, batch in enumerate(
            tqdm(loader, desc=f"pretrain {epoch + 1}/{epochs}", leave=False, disable=None)
        ):
            part.step(step, len(loader))
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
    control.step(1, 1)
    backbone.eval().requires_grad_(False)
    return history


def run_pretraining(config: PretrainConfig, control: Control = NO_CONTROL) -> Pretrained:
    """Pretrain `config.preset` on the split's records and save it to `config.out`.

    Raises ValueError when the split has no records, `Cancelled` when `control` is cancelled
    (then nothing is written).
    """
    records = select(read_manifest(config.manifest), split=config.split)
    if not records:
        raise ValueError(f"{config.manifest} has no records of split {config.split!r}")
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    backbone = Backbone(load_preset(config.preset))
    loader = make_loader(
        records,
        backbone.config.vision.image_size,
        config.batch_size,
        shuffle=True,
        seed=config.seed,
        num_workers=config.workers,
        cache=True,
        drop_last=True,
    )
    control.check()  # decoding a large split takes a moment
    history = pretrain(
        backbone, loader, config.epochs, config.lr, config.weight_decay, config.device, control
    )
    config.out.parent.mkdir(parents=True, exist_ok=True)
    save_backbone(backbone.cpu(), config.out)
    return Pretrained(config.out, history, len(records), time.perf_counter() - start)
