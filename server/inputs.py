"""Request items -> model rows, with every limit checked and every failure naming its field.

Images arrive as bytes (decoded from base64 or read from a multipart file); their size is read
from the header before any pixel is decoded, so a decompression bomb is refused without being
expanded. Texts are tokenised with CLIP's tokenizer and cut after their end-of-text token, so
the batcher pads each batch only to its longest text.

Dimensions: S the image side, T a text's tokens.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

import lpi
from lpi.tokenizer import token_ids
from server.errors import ApiError


@dataclass(frozen=True)
class Limits:
    max_items: int
    max_image_pixels: int
    max_text_chars: int
    image_size: int
    context_length: int


def decode_base64(text: str, field: str) -> bytes:
    """Standard or URL-safe base64, padding optional; whitespace ignored."""
    compact = "".join(text.split())
    compact += "=" * (-len(compact) % 4)
    urlsafe = "-" in compact or "_" in compact
    try:
        if urlsafe:
            return base64.b64decode(compact.replace("-", "+").replace("_", "/"), validate=True)
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_base64", f"{field}: not valid base64", field) from None


def check_count(texts: int, images: int, limits: Limits, field: str = "texts") -> None:
    total = texts + images
    if total == 0:
        raise ApiError(422, "empty_batch", "nothing to embed: give texts or images", field)
    if total > limits.max_items:
        raise ApiError(
            413, "too_many_items", f"{total} items; this server takes at most "
            f"{limits.max_items} per request", field,
        )  # fmt: skip


def image_rows(blobs: list[bytes], limits: Limits, fields: list[str]) -> list[Tensor]:
    """Image files -> pixels [3, S, S] each, as `lpi.preprocess` makes them."""
    pairs = zip(blobs, fields, strict=True)
    images = [open_image(blob, limits.max_image_pixels, field) for blob, field in pairs]
    pixels = lpi.preprocess(images, limits.image_size, max_pixels=limits.max_image_pixels)
    return list(pixels)  # B x [3, S, S]


def open_image(blob: bytes, max_pixels: int, field: str) -> Image.Image:
    """Decode one image; refuse non-images and anything over `max_pixels` before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(blob))
            width, height = image.size
            if width * height > max_pixels:
                raise ApiError(
                    413, "image_too_large", f"{field}: {width}x{height} pixels; the limit is "
                    f"{max_pixels}", field,
                )  # fmt: skip
            image.load()
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, "image_too_large", f"{field}: decompression bomb", field) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:
        raise ApiError(
            422, "invalid_image", f"{field}: not a readable image ({err})", field
        ) from None
    if image.width < 1 or image.height < 1:
        raise ApiError(422, "invalid_image", f"{field}: the image is empty", field)
    return image


def text_rows(texts: list[str], limits: Limits, fields: list[str]) -> list[Tensor]:
    """Texts -> token ids [T_i] each, cut after the end-of-text token."""
    for text, field in zip(texts, fields, strict=True):
        if len(text) > limits.max_text_chars:
            raise ApiError(
                413, "text_too_long", f"{field}: {len(text)} characters; the limit is "
                f"{limits.max_text_chars}", field,
            )  # fmt: skip
        if "\x00" in text:
            raise ApiError(422, "invalid_text", f"{field}: contains a NUL character", field)
    return [torch.tensor(ids) for ids in token_ids(list(texts), limits.context_length)]
