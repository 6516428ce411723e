"""CLIP image preprocessing with PIL and numpy only (no torchvision at run time).

The same function as open_clip's evaluation transform: RGB conversion, bicubic resize of the
shorter side, centre crop, scale to [0, 1], normalise with OpenAI's statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# Images are converted with PIL's convert("RGB"), as CLIP does: greyscale is replicated and
# alpha is dropped. Modes outside this set (e.g. 32-bit float) have no meaningful RGB view.
CONVERTIBLE_MODES = {
    "1",
    "L",
    "LA",
    "P",
    "PA",
    "RGB",
    "RGBA",
    "RGBX",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
    "I;16",
    "I;16L",
    "I;16B",
}
DEFAULT_MAX_PIXELS = 64_000_000
# Beyond this aspect ratio the image is first cut to its central square region, so a 1 x
# 100,000 strip is not resized to a 224 x 22,400,000 one; within it, the result is open_clip's.
_PRECROP_ASPECT = 8.0


def preprocess(
    images: Image.Image | Sequence[Image.Image],
    image_size: int = 224,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Tensor:
    """PIL images -> normalised pixels [B, 3, image_size, image_size] (float32)."""
    if isinstance(images, Image.Image):
        images = [images]
    if len(images) == 0:
        raise ValueError("images is empty")
    arrays = [_to_array(image, index, image_size, max_pixels) for index, image in enumerate(images)]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [B, 3, S, S]
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def _to_array(image: Image.Image, index: int, size: int, max_pixels: int) -> np.ndarray:
    if not isinstance(image, Image.Image):
        raise TypeError(f"images[{index}] is {type(image).__name__}, not a PIL image")
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"images[{index}] is empty ({width}x{height})")
    if width * height > max_pixels:
        raise ValueError(
            f"images[{index}] has {width}x{height} = {width * height:,} pixels, above "
            f"max_pixels={max_pixels:,}"
        )
    if image.mode not in CONVERTIBLE_MODES:
        raise ValueError(f"images[{index}] has mode {image.mode!r}, which has no RGB conversion")
    image = _precrop(image.convert("RGB"))
    image = _resize_shorter_side(image, size)
    return np.asarray(_centre_crop(image, size), dtype=np.uint8)  # [S, S, 3]


def _precrop(image: Image.Image) -> Image.Image:
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if long <= _PRECROP_ASPECT * short:
        return image
    keep = round(_PRECROP_ASPECT * short)
    if width > height:
        left = (width - keep) // 2
        return image.crop((left, 0, left + keep, height))
    top = (height - keep) // 2
    return image.crop((0, top, width, top + keep))


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(size) on PIL: shorter side to `size`, longer side truncated."""
    width, height = image.size
    if width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    return image.resize(new, Image.Resampling.BICUBIC) if new != image.size else image


def _centre_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return image.crop((left, top, left + size, top + size))
