"""Request items -> model rows, with every limit checked and every failure naming its field.

Images arrive as bytes (decoded from base64 or read from a multipart file); their size is read
from the header before any pixel is decoded, so a decompression bomb is refused without being
expanded. Every mode Pillow opens reaches the model as 8-bit pixels (`eight_bit`): 16-bit,
32-bit and float greyscale are scaled from their range, not clipped at 255.

Texts are tokenised with CLIP's tokenizer and cut after their end-of-text token, so
the batcher pads each batch only to its longest text.

Dimensions: S the image side, T a text's tokens.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

import lpi
from lpi.preprocess import CONVERTIBLE_MODES
from lpi.tokenizer import token_ids
from server.exceptions import (
    EmptyBatchError,
    ImageTooLargeError,
    InvalidBase64Error,
    InvalidImageError,
    InvalidTextError,
    TextTooLongError,
    TooManyItemsError,
)


@dataclass(frozen=True)
class Limits:
    max_items: int
    max_image_pixels: int
    max_text_chars: int
    image_size: int
    context_length: int
    thumbnail_max_side: int = 160  # index-time thumbnails (server.thumbnails)
    thumbnail_max_bytes: int = 24_576


def decode_base64(text: str, field: str) -> bytes:
    """Standard or URL-safe base64, padding optional, whitespace ignored; or a base64 data URI
    (`data:image/png;base64,...`, as browsers make them). A URL is refused: the server never
    fetches anything a request names."""
    head = text[:16].lstrip().lower()
    if head.startswith(("http://", "https://")):
        raise InvalidBase64Error(f"{field}: URLs are never fetched: send the bytes", field)
    if head.startswith("data:"):
        meta, comma, text = text.partition(",")
        if not comma or not meta.lower().rstrip().endswith(";base64"):
            raise InvalidBase64Error(
                f"{field}: a data URI must be base64 (data:image/png;base64,...)", field
            )
    compact = "".join(text.split())
    compact += "=" * (-len(compact) % 4)
    urlsafe = "-" in compact or "_" in compact
    try:
        if urlsafe:
            return base64.b64decode(compact.replace("-", "+").replace("_", "/"), validate=True)
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidBase64Error(f"{field}: not valid base64", field) from None


def check_count(texts: int, images: int, limits: Limits, field: str = "texts") -> None:
    total = texts + images
    if total == 0:
        raise EmptyBatchError("nothing to embed: give texts or images", field)
    if total > limits.max_items:
        raise TooManyItemsError(
            f"{total} items; this server takes at most {limits.max_items} per request",
            field,
        )


def image_rows(blobs: list[bytes], limits: Limits, fields: list[str]) -> list[Tensor]:
    """Image files -> pixels [3, S, S] each, as `lpi.preprocess` makes them."""
    rows = []
    for blob, field in zip(blobs, fields, strict=True):
        image = eight_bit(open_image(blob, limits.max_image_pixels, field), field)
        try:
            pixels = lpi.preprocess(image, limits.image_size, max_pixels=limits.max_image_pixels)
        except (ValueError, OSError) as err:  # e.g. pixel data that fails while resampling
            raise InvalidImageError(f"{field}: not a readable image ({err})", field) from None
        rows.append(pixels[0])  # [3, S, S]
    return rows


def open_image(blob: bytes, max_pixels: int, field: str) -> Image.Image:
    """Decode one image; refuse non-images and anything over `max_pixels` before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(blob))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"{field}: {width}x{height} pixels; the limit is {max_pixels}",
                    field,
                )
            image.load()
    except ImageTooLargeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(f"{field}: decompression bomb", field) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:
        raise InvalidImageError(f"{field}: not a readable image ({err})", field) from None
    if image.width < 1 or image.height < 1:
        raise InvalidImageError(f"{field}: the image is empty", field)
    return image


# Modes lpi.preprocess converts to RGB as CLIP does, with 8 bits (or fewer) per channel.
EIGHT_BIT_MODES = frozenset(m for m in CONVERTIBLE_MODES if not m.startswith("I;16"))
PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}  # alpha multiplied in: Pillow undoes it
UINT16_MAX = 65535


def eight_bit(image: Image.Image, field: str) -> Image.Image:
    """`image` in a mode lpi.preprocess converts to RGB, high-bit-depth greyscale scaled to L.

    Scaling, from the smallest range the data allows (a 16-bit PPM, PNG or TIFF opens as I;16 or
    as I holding 0..65535, whatever its maxval; 32-bit float is most often 0..1):
    I;16* -> v / 257 (0..65535 onto 0..255); I -> v / 257 when within 0..65535;
    F -> v * 255 when within 0..1, v when within 0..255. Anything else (negative, or past those
    ranges) is stretched from its own minimum and maximum. Non-finite floats are refused.
    """
    mode = image.mode
    if mode in EIGHT_BIT_MODES:
        return image
    if mode in PREMULTIPLIED:
        return image.convert(PREMULTIPLIED[mode])
    if mode not in ("I", "F") and not mode.startswith("I;16"):
        raise InvalidImageError(f"{field}: pixels of mode {mode!r} have no RGB view", field)
    values = np.asarray(image, dtype=np.float32)  # [H, W]
    if not np.isfinite(values).all():
        raise InvalidImageError(f"{field}: float pixels that are not finite", field)
    low, high = float(values.min()), float(values.max())
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= UINT16_MAX):
        scaled = values / 257.0
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    elif mode == "F" and low >= 0 and high <= 255:
        scaled = values
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else values * 0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def text_rows(texts: list[str], limits: Limits, fields: list[str]) -> list[Tensor]:
    """Texts -> token ids [T_i] each, cut after the end-of-text token."""
    for text, field in zip(texts, fields, strict=True):
        if len(text) > limits.max_text_chars:
            raise TextTooLongError(
                f"{field}: {len(text)} characters; the limit is {limits.max_text_chars}",
                field,
            )
        if "\x00" in text:
            raise InvalidTextError(f"{field}: contains a NUL character", field)
    return [torch.tensor(ids) for ids in token_ids(list(texts), limits.context_length)]
