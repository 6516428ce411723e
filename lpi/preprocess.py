"""CLIP image preprocessing with PIL and numpy only (no torchvision at run time).

The same function as open_clip's evaluation transform, step for step: bicubic resize of the
shorter side (in the image's own mode, as torchvision does), centre crop, RGB conversion, scale
to [0, 1], normalise with OpenAI's statistics. Shapes: B images, S the square side.
"""

from __future__ import annotations

import math
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
# Up to this many pixels the shorter side is resized over the whole image, exactly as open_clip
# does (3000 x 20 -> 33,600 x 224 is 7.5M). Beyond it, only the window the crop keeps is
# resampled, so a 1 x 20,000 strip never becomes a 4,480,000 x 224 intermediate.
MAX_RESIZED_PIXELS = 16_000_000
_BICUBIC_SUPPORT = 2.0  # the bicubic kernel's radius, in source pixels when enlarging


def preprocess(
    images: Image.Image | Sequence[Image.Image],
    image_size: int = 224,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Tensor:
    """PIL images -> normalised pixels [B, 3, S, S] (float32), S = image_size."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, np.ndarray | Tensor | str | bytes):
        raise TypeError(f"images must be PIL images, got {type(images).__name__}")
    images = list(images)
    if len(images) == 0:
        raise ValueError("images is empty")
    arrays = [_to_array(image, index, image_size, max_pixels) for index, image in enumerate(images)]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [B, 3, S, S] uint8
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def _to_array(image: Image.Image, index: int, size: int, max_pixels: int) -> np.ndarray:
    """Checks run on the header alone, before PIL decodes a single pixel."""
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
    square = _resize_and_crop(image, size).convert("RGB")
    return np.array(square, dtype=np.uint8)  # [S, S, 3], a writable copy


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's Resize(size): shorter side to `size`, longer side truncated."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize(size, bicubic) then CenterCrop(size), as open_clip composes them."""
    width, height = image.size
    new_w, new_h = resized_size(width, height, size)
    left, top = round((new_w - size) / 2.0), round((new_h - size) / 2.0)
    if new_w * new_h > MAX_RESIZED_PIXELS:
        return _resample_window(image, (new_w, new_h), (left, top), size)
    if (new_w, new_h) != (width, height):  # torchvision returns the image itself otherwise
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    return image.crop((left, top, left + size, top + size))


def _resample_window(
    image: Image.Image, resized: tuple[int, int], corner: tuple[int, int], size: int
) -> Image.Image:
    """Only the crop's window of the resized image: same scale, same sample positions.

    The source is first cut around the window (plus the kernel's reach) so that PIL's float32
    box coordinates stay small. Their rounding, and PIL choosing its pass order from the source
    size, still move a few pixels by a grey level or two against the whole-image resize.
    """
    width, height = image.size
    scale_x, scale_y = width / resized[0], height / resized[1]
    x0, y0 = corner[0] * scale_x, corner[1] * scale_y
    x1 = min(x0 + size * scale_x, width)  # float rounding must not step outside the image
    y1 = min(y0 + size * scale_y, height)
    margin_x = math.ceil(_BICUBIC_SUPPORT * max(scale_x, 1.0)) + 1
    margin_y = math.ceil(_BICUBIC_SUPPORT * max(scale_y, 1.0)) + 1
    left = max(0, math.floor(x0) - margin_x)
    top = max(0, math.floor(y0) - margin_y)
    right = min(width, math.ceil(x1) + margin_x)
    bottom = min(height, math.ceil(y1) + margin_y)
    source = image.crop((left, top, right, bottom))
    box = (x0 - left, y0 - top, x1 - left, y1 - top)
    return source.resize((size, size), Image.Resampling.BICUBIC, box=box)
