"""Tokenizer and image preprocessing against open_clip (lpi/tokenizer.py, lpi/preprocess.py)."""

from __future__ import annotations

import io
import logging
import sys
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import lpi

open_clip = pytest.importorskip("open_clip", reason="open_clip imports only beside torchvision")

preprocess_module = sys.modules["lpi.preprocess"]  # `lpi.preprocess` is the function
SOT, EOT = 49406, 49407

TEXTS = [
    "a photo of a cat",
    "",
    "   leading, trailing and    inner   whitespace\t\n\r ",
    "Punctuation!!! (brackets) [more]; semi-colons: quotes \"double\" 'single' — dashes…",
    "HTML entities: &amp; &lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;apos&#39; &nbsp;x",
    "unicode: café naïve Ünïcödé ßtraße Ελληνικά русский 中文字符 日本語 한국어 עברית",
    "emoji 🐱🚀 and combining e\u0301 and zero\u200bwidth",
    "mojibake cafÃ© and â€œsmart quotesâ€\x9d",
    "MiXeD CaSe and numbers 1234567890 3.14 1e-5 #hashtag @user http://example.com/x?y=1",
    "dog " * 200,  # far over the context
    "x" * 5000,  # one very long word
]


def test_tokenize_equals_open_clip():
    assert torch.equal(lpi.tokenize(TEXTS), open_clip.tokenize(TEXTS))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=300), min_size=1, max_size=4))
def test_tokenize_equals_open_clip_on_any_text(texts):
    assert torch.equal(lpi.tokenize(texts), open_clip.tokenize(texts))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=300), min_size=1, max_size=4))
def test_token_ids_are_the_unpadded_rows_of_tokenize(texts):
    """The server pads batches itself from these rows: they must be tokenize's, cut at EOT."""
    from lpi.tokenizer import token_ids

    padded = lpi.tokenize(texts)
    for row, ids in zip(padded, token_ids(texts), strict=True):
        assert row[: len(ids)].tolist() == ids and not row[len(ids) :].any()


def _words(count: int) -> str:
    """`count` BPE tokens: each "a" followed by a space is one token."""
    return " ".join(["a"] * count)


def test_text_that_just_fits_is_not_truncated(caplog):
    """75 tokens + start + end-of-text = 77: fits exactly, nothing logged."""
    with caplog.at_level(logging.WARNING, logger="lpi.tokenizer"):
        row = lpi.tokenize([_words(75)])[0]
    assert row[0] == SOT and row[76] == EOT and (row != 0).all()
    assert caplog.records == []


def test_overlong_text_is_truncated_with_eot_last_and_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="lpi.tokenizer"):
        tokens = lpi.tokenize(["short", _words(76), "dog " * 200])
    assert tokens.shape == (3, 77)
    for row in tokens[1:]:
        assert row[0] == SOT and row[-1] == EOT and (row != 0).all()
        assert (row[1:-1] != EOT).all()  # the end-of-text is the last token, nowhere else
    (record,) = caplog.records
    assert "truncated" in record.getMessage() and record.rows == [1, 2]


def test_empty_list_is_refused():
    with pytest.raises(ValueError, match="non-empty list of strings"):
        lpi.tokenize([])


def test_non_string_item_is_refused():
    with pytest.raises(TypeError, match=r"texts\[1\] is int, not str"):
        lpi.tokenize(["a cat", 3])


# ---- preprocess ----
# Tolerance 1e-6: both sides make the same uint8 pixels with the same PIL calls, then compute
# (x / 255 - mean) / std in float32 in the same order; only rounding could differ (one float32
# ulp, below 3e-7 for |values| < 2.7). One grey level of difference would be 0.0146.
TOLERANCE = 1e-6
# The windowed path resamples with float32 box coordinates: up to 2 grey levels off (0.030).
WINDOW_TOLERANCE = 2 / 255 / min(preprocess_module.OPENAI_STD)

SIZES = [(1, 1), (3000, 20), (20, 3000), (224, 224), (225, 224), (640, 480), (333, 517), (7, 5)]


def _random_image(size: tuple[int, int], mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = size
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "P")
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tolist())
        return image
    bands = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if bands == 1 else pixels, mode)


def _open_clip_pixels(image: Image.Image, size: int = 224) -> torch.Tensor:
    return open_clip.transform.image_transform(size, is_train=False)(image)[None]


MODES = ["RGB", "L", "RGBA", "P"]


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
@pytest.mark.parametrize("mode", MODES)
def test_preprocess_equals_open_clip(mode, size):
    image = _random_image(size, mode, seed=100 * MODES.index(mode) + SIZES.index(size))
    ours = lpi.preprocess(image)
    assert ours.shape == (1, 3, 224, 224) and ours.dtype == torch.float32
    assert (ours - _open_clip_pixels(image)).abs().max().item() <= TOLERANCE


def test_preprocess_other_sizes_and_batches():
    images = [_random_image(size, "RGB", seed=i) for i, size in enumerate([(50, 70), (33, 32)])]
    ours = lpi.preprocess(images, image_size=32)
    assert ours.shape == (2, 3, 32, 32)
    reference = torch.cat([_open_clip_pixels(image, 32) for image in images])
    assert (ours - reference).abs().max().item() <= TOLERANCE


def _smooth_image(size: tuple[int, int], mode: str, seed: int) -> Image.Image:
    """Random but smooth, like a photograph: noise at 1/16 resolution, upsampled."""
    width, height = size
    small = _random_image((max(2, width // 16), max(2, height // 16)), mode, seed)
    return small.resize(size, Image.Resampling.BILINEAR)


@pytest.mark.parametrize("size", [(640, 480), (333, 517), (3000, 20), (9, 700)])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_windowed_resample_stays_close_to_open_clip(mode, size, monkeypatch):
    """The path for extreme aspect ratios, forced on ordinary images to compare it.

    Smooth images: on pixel noise, PIL's size-dependent pass order alone clips bicubic
    overshoot differently, which says nothing about the window's geometry.
    """
    monkeypatch.setattr(preprocess_module, "MAX_RESIZED_PIXELS", 0)
    image = _smooth_image(size, mode, seed=size[0])
    diff = (lpi.preprocess(image) - _open_clip_pixels(image)).abs()
    assert diff.max().item() <= WINDOW_TOLERANCE
    assert diff.mean().item() <= WINDOW_TOLERANCE / 10  # almost every pixel is exact


@pytest.mark.parametrize("size", [(20_000, 1), (1, 20_000)], ids=["wide", "tall"])
def test_extreme_aspect_ratio_never_builds_the_full_resize(size, monkeypatch):
    """open_clip would resize 1 x 20,000 to 224 x 4,480,000 (4 GB in RGB) before cropping."""
    areas = []
    resize = Image.Image.resize

    def recording_resize(self, new_size, *args, **kwargs):
        areas.append(new_size[0] * new_size[1])
        return resize(self, new_size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    pixels = lpi.preprocess(_random_image(size, "RGB", seed=0))
    assert pixels.shape == (1, 3, 224, 224) and torch.isfinite(pixels).all()
    # The full resize would hold 1e9 pixels; 64 crops' worth (3.2M) is already generous.
    assert areas and max(areas) <= 64 * 224 * 224


def _png_claiming(width: int, height: int) -> Image.Image:
    """A 1x1 PNG whose header claims another size: PIL opens it lazily without decoding."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")  # IHDR width, height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # IHDR checksum
    return Image.open(io.BytesIO(bytes(data)))


def test_huge_image_is_refused_before_decoding():
    with pytest.raises(ValueError, match=r"images\[0\] has 9000x9000 = 81,000,000 pixels"):
        lpi.preprocess(_png_claiming(9000, 9000))


def test_max_pixels_is_configurable():
    with pytest.raises(ValueError, match=r"40x30 = 1,200 pixels, above max_pixels=1,000"):
        lpi.preprocess(Image.new("RGB", (40, 30)), max_pixels=1000)


@pytest.mark.parametrize("mode", ["F", "I"])
def test_mode_without_rgb_conversion_is_refused(mode):
    with pytest.raises(ValueError, match=f"mode '{mode}', which has no RGB conversion"):
        lpi.preprocess([Image.new("RGB", (4, 4)), Image.new(mode, (4, 4))])


def test_non_pil_item_is_refused():
    with pytest.raises(TypeError, match=r"images\[1\] is ndarray, not a PIL image"):
        lpi.preprocess([Image.new("RGB", (4, 4)), np.zeros((4, 4, 3), dtype=np.uint8)])


def test_array_instead_of_images_is_refused():
    with pytest.raises(TypeError, match="images must be PIL images, got ndarray"):
        lpi.preprocess(np.zeros((4, 4, 3), dtype=np.uint8))


def test_empty_list_of_images_is_refused():
    with pytest.raises(ValueError, match="images is empty"):
        lpi.preprocess([])
