"""Training a small CLIP from scratch: `run_pretraining(config)`, the demo's frozen backbone.

No pretrained CLIP weights can be had offline, so tests and the demo pretrain one on the
synthetic captioned images (`python -m lpi.continual.data.synthetic`). Real users skip this
and point training at a real checkpoint. The result is one safetensors file with its
architecture. `python -m lpi.pretrain` is its CLI.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from lpi import atomic
from lpi.backbone import Backbone
from lpi.checkpoint import save_backbone
from lpi.config import load_preset
from lpi.continual import losses
from lpi.continual.compact_vocab import compact_vocabulary, used_tokens
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
    # Optimise only the token embedding rows the captions use (the same model, faster).
    compact_vocabulary: bool = True

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


def param_groups(backbone: Backbone) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on embeddings, norms and biases."""
    decay = [p for n, p in backbone.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in backbone.named_parameters() if p.dim() < 2 or "embedding" in n]
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0}]


def train_step(
    backbone: Backbone,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """One contrastive step on a batch; returns the (detached) loss."""
    image = backbone.encode_image(batch.pixels.to(device))
    text = backbone.encode_text(batch.tokens.to(device))
    loss = losses.clip_loss(image, text, backbone.logit_scale)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        backbone.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return loss.detach()


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
    steps = epochs * len(loader)
    optimizer, scheduler = make_optimizer(param_groups(backbone), lr, weight_decay, steps)
    history = []
    for epoch in range(epochs):
        total, count = 0.0, 0
        part = control.part(epoch / epochs, (epoch + 1) / epochs, f"(epoch {epoch + 1}/{epochs})")
        for step, batch in enumerate(
            tqdm(loader, desc=f"pretrain {epoch + 1}/{epochs}", leave=False, disable=None)
        ):
            part.step(step, len(loader))
            loss = train_step(backbone, batch, optimizer, device)
            scheduler.step()
            total += float(loss) * len(batch.pixels)
            count += len(batch.pixels)
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
    context = backbone.config.text.context_length
    used = used_tokens((c for r in records for c in r.captions), context)
    with compact_vocabulary(backbone, used) if config.compact_vocabulary else nullcontext():
        history = pretrain(
            backbone, loader, config.epochs, config.lr, config.weight_decay, config.device, control
        )
    config.out.parent.mkdir(parents=True, exist_ok=True)
    save_backbone(backbone.cpu(), config.out)
    return Pretrained(config.out, history, len(records), time.perf_counter() - start)


# --- a backbone built once per recipe ----------------------------------------------------------

RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "backbone.safetensors"
UNCACHED_FIELDS = ("manifest", "out", "device", "workers")  # do not change what is learnt


class CacheMismatch(ValueError):
    """A cached backbone whose recorded recipe or weights do not match; the message names it."""


def recipe_of(config: PretrainConfig) -> dict[str, Any]:
    """What a pretraining run's weights depend on: the config (less where it reads and writes
    and how it loads), the preset's architecture and the data's content hash."""
    fields = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in UNCACHED_FIELDS
    }
    return {
        **fields,
        "architecture": load_preset(config.preset).to_dict(),
        "data": data_hash(config.manifest, config.split),
    }


def data_hash(manifest: Path, split: str) -> str:
    """sha256 over the split's records in order: each image's bytes and its captions."""
    digest = hashlib.sha256()
    for record in select(read_manifest(manifest), split=split):
        digest.update(hashlib.sha256(Path(record.image).read_bytes()).digest())
        digest.update(json.dumps(record.captions).encode())
    return digest.hexdigest()


def recipe_hash(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def cached_backbone(
    config: PretrainConfig, cache_dir: str | Path, control: Control = NO_CONTROL
) -> Path:
    """The backbone `config` describes, pretrained once and then reused: its .safetensors path.

    The recipe (`recipe_of`: preset and its architecture, the split's content hash over image
    bytes and captions, epochs, batch size, lr, weight decay, seed, compact_vocabulary) hashes
    to the folder `cache_dir/<preset>-<hash[:16]>/`, which holds backbone.safetensors and
    recipe.json (the recipe, its hash and the weights' sha256). `config.out`, `device` and
    `workers` are ignored: the cache names the file. A folder without recipe.json is built
    (again); a cached file whose recorded recipe hash does not match its recipe or this
    config's, or whose weights' sha256 does not match the recorded one, raises CacheMismatch
    naming the file (delete the folder to rebuild). Both files are written atomically, the
    weights first, so a crash never leaves a recipe without its weights.
    """
    recipe = recipe_of(config)
    key = recipe_hash(recipe)
    folder = Path(cache_dir) / f"{config.preset}-{key[:16]}"
    weights, record = folder / WEIGHTS_FILE, folder / RECIPE_FILE
    if record.is_file():
        _check_cached(record, weights, key)
        log.info("cached backbone %s (recipe %s)", weights, key[:16])
        return weights
    log.info("pretraining %s into the cache %s", config.preset, folder)
    result = run_pretraining(dataclasses.replace(config, out=weights), control)
    atomic.write_json(
        record,
        {
            "recipe": json.loads(json.dumps(recipe, default=str)),
            "recipe_hash": key,
            "weights_sha256": _file_hash(weights),
            "history": result.history,
            "seconds": round(result.seconds, 2),
        },
        indent=1,
    )
    return weights


def _check_cached(record: Path, weights: Path, key: str) -> None:
    try:
        saved = json.loads(record.read_text())
        recorded, stored_recipe, sha = (
            saved["recipe_hash"],
            saved["recipe"],
            saved["weights_sha256"],
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CacheMismatch(f"{record}: not a readable cache record ({error})") from error
    if recipe_hash(stored_recipe) != recorded or recorded != key:
        raise CacheMismatch(
            f"{record}: its recorded recipe hash {str(recorded)[:16]} does not match its recipe "
            f"or this config's {key[:16]}; delete {record.parent} to rebuild"
        )
    if not weights.is_file() or _file_hash(weights) != sha:
        raise CacheMismatch(
            f"{weights}: missing or its sha256 does not match the one recorded in {record}; "
            f"delete {record.parent} to rebuild"
        )


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
