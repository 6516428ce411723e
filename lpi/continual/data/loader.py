"""Batches of (pixels, caption tokens, image index) for training, and whole galleries for tests.

Pixels come from `lpi.preprocess`, the function the server runs, so a model is trained and
served on the same pixels. All randomness (the shuffle and which caption each image shows) is
drawn by `CaptionSampler` in the main process and handed to the workers inside the index, so a
run gives the same batches with 0 or 8 workers, and persistent workers need no epoch hook.

Dimensions: B batch, S image side, L context length (77), I images, C captions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from lpi.continual.data.manifest import Record
from lpi.preprocess import preprocess
from lpi.tokenizer import tokenize

log = logging.getLogger(__name__)

CACHE_LIMIT_BYTES = 2 * 1024**3  # refuse to hold more decoded pixels than this in memory


class Batch(NamedTuple):
    pixels: Tensor  # [B, 3, S, S] float32
    tokens: Tensor  # [B, L] int64
    image_index: Tensor  # [B] int64, into the dataset's records


def load_pixels(path: str | Path, image_size: int) -> Tensor:
    """One image file -> [3, S, S] through lpi.preprocess (the serving path)."""
    with Image.open(path) as image:
        image.load()
        return preprocess([image], image_size)[0]


class CaptionDataset(Dataset):
    """Images of `records`; item (i, draw) is image i with caption `draw % len(captions)`."""

    def __init__(self, records: Sequence[Record], image_size: int, cache: bool = False):
        if len(records) == 0:
            raise ValueError("CaptionDataset needs at least one record")
        self.records = list(records)
        self.image_size = image_size
        self.pixels = _decode_all(self.records, image_size) if cache else None  # [I, 3, S, S]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor, int]:
        index, draw = key if isinstance(key, tuple) else (key, 0)
        record = self.records[index]
        caption = record.captions[draw % len(record.captions)]
        if self.pixels is not None:
            pixels = self.pixels[index]
        else:
            pixels = load_pixels(record.image, self.image_size)
        return pixels, tokenize([caption])[0], index  # [3, S, S], [L], int


def _decode_all(records: Sequence[Record], image_size: int) -> Tensor:
    size = len(records) * 3 * image_size * image_size * 4
    if size > CACHE_LIMIT_BYTES:
        raise ValueError(
            f"caching {len(records)} images at {image_size}px needs {size / 1024**3:.1f} GiB "
            f"(limit {CACHE_LIMIT_BYTES / 1024**3:.0f} GiB); load them from disk instead"
        )
    pixels = torch.empty(len(records), 3, image_size, image_size)
    bar = tqdm(records, desc="decode", unit="img", leave=False, disable=None)  # terminal only
    for index, record in enumerate(bar):
        pixels[index] = load_pixels(record.image, image_size)
    return pixels


class CaptionSampler(Sampler):
    """Yields (image index, caption draw); a new shuffle and new draws each epoch, from `seed`."""

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0):
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(self.size, generator=generator) if self.shuffle else None
        draws = torch.randint(0, 2**31 - 1, (self.size,), generator=generator)
        if order is None:
            order = torch.arange(self.size)
        return iter(zip(order.tolist(), draws[order].tolist(), strict=True))


def collate(items: Sequence[tuple[Tensor, Tensor, int]]) -> Batch:
    pixels, tokens, index = zip(*items, strict=True)
    return Batch(torch.stack(pixels), torch.stack(tokens), torch.tensor(index, dtype=torch.long))


def make_loader(
    records: Sequence[Record],
    image_size: int,
    batch_size: int = 64,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    cache: bool = False,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A training loader: each epoch, every image once with one caption drawn from `seed`.

    `drop_last` never drops the only batch: a set smaller than `batch_size` is one batch.
    """
    dataset = CaptionDataset(records, image_size, cache=cache)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=CaptionSampler(len(dataset), shuffle, seed),
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        drop_last=drop_last and len(dataset) >= batch_size,
        pin_memory=pin_memory,
    )


# --- evaluation --------------------------------------------------------------------------------


class EvalSet(NamedTuple):
    pixels: Tensor  # [I, 3, S, S]
    captions: list[str]  # [C]
    caption_to_image: Tensor  # [C] int64, index into pixels


def eval_captions(records: Sequence[Record]) -> tuple[list[str], Tensor]:
    """Every caption of every image, and the image each belongs to ([C] int64)."""
    captions = [caption for record in records for caption in record.captions]
    owners = [index for index, record in enumerate(records) for _ in record.captions]
    return captions, torch.tensor(owners, dtype=torch.long)


def image_batches(
    records: Sequence[Record], image_size: int, batch_size: int = 256, num_workers: int = 0
) -> Iterator[Tensor]:
    """Pixels [B, 3, S, S] of the records in order, for galleries too large to hold at once."""
    loader = DataLoader(
        _Images(records, image_size),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=torch.stack,
    )
    yield from loader


def eval_set(records: Sequence[Record], image_size: int, num_workers: int = 0) -> EvalSet:
    """A whole test gallery in memory: pixels, all captions, caption -> image."""
    if len(records) == 0:
        raise ValueError("eval_set needs at least one record")
    pixels = torch.cat(list(image_batches(records, image_size, num_workers=num_workers)))
    captions, owners = eval_captions(records)
    return EvalSet(pixels, captions, owners)


class _Images(Dataset):
    def __init__(self, records: Sequence[Record], image_size: int):
        self.records = list(records)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Tensor:
        return load_pixels(self.records[index].image, self.image_size)
