"""Every image mode Pillow can write reaches the model through /embed, or is a 422 naming it.

High-bit-depth greyscale is scaled to 8 bits, not clipped (a 16-bit PPM once answered 500 "has
no RGB conversion"). The reference for the scaled modes is the same values brought to 8 bits
by hand in numpy and sent as an ordinary PNG: the embeddings must agree per vector (cosine >=
0.9999: the same uint8 pixels reach the same model, so only the batch's summation order could
differ).
"""

from __future__ import annotations

import io
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from server.exceptions import InvalidImageError
from server.inputs import eight_bit
from tests.server_helpers import b64, cosines, create_app, run, running, settings

MIN_COSINE = 0.9999
SIDE = 16
# The server reads IM files too (Pillow deprecates the format, not yet removed): quiet here.
pytestmark = pytest.mark.filterwarnings("ignore:IM image format is deprecated:DeprecationWarning")


def random_image(mode: str, rng: np.random.Generator) -> Image.Image:
    """Random pixels in `mode`: raw random bytes, except I and F, which get 16-bit values
    (and 0..1 floats), as their files usually hold."""
    if mode == "F":
        return Image.fromarray(rng.random((SIDE, SIDE), dtype=np.float32))
    if mode == "I":
        return Image.fromarray(rng.integers(0, 65536, (SIDE, SIDE)).astype(np.int32))
    size = len(Image.new(mode, (SIDE, SIDE)).tobytes())
    return Image.frombytes(mode, (SIDE, SIDE), rng.bytes(size))


def written_files() -> list[tuple[str, str, bytes, bool]]:
    """(mode, format, file, whether Pillow reads it back) for every mode Pillow lists and
    every format that can save it."""
    Image.init()
    rng = np.random.default_rng(0)
    files = []
    for mode in Image.MODES:
        image = random_image(mode, rng)
        for fmt in sorted(Image.SAVE):
            out = io.BytesIO()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    image.save(out, fmt)
            except (OSError, ValueError, KeyError, TypeError):
                continue  # this format cannot hold this mode
            files.append((mode, fmt, out.getvalue(), pillow_reads(out.getvalue())))
    return files


def pillow_reads(blob: bytes) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.open(io.BytesIO(blob)).load()
    except Exception:  # any failure: a format Pillow writes but cannot read
        return False
    return True


@pytest.fixture(scope="module")
def app_config(tiny_runs, tmp_path_factory):
    inbox = tmp_path_factory.mktemp("inbox")
    return settings(tiny_runs, tmp_path_factory.mktemp("data"), inbox, max_items=64)


def embed(app_config, images: list[bytes], chunk: int = 64) -> list:
    """One /embed per `chunk` images (the server's max_items), in one app; the responses."""

    async def scenario():
        async with running(create_app(app_config)) as client:
            return [
                await client.post("/embed", json={"images": [b64(i) for i in images[at:][:chunk]]})
                for at in range(0, len(images), chunk)
            ]

    return run(scenario())


def test_every_mode_pillow_writes_is_embedded(app_config):
    """What Pillow reads back is embedded, every mode; what it cannot read (PDF, EPS without
    Ghostscript, ...) is a 422 naming the item."""
    files = written_files()
    readable = [blob for _, _, blob, reads in files if reads]
    modes = {mode for mode, _, _, reads in files if reads}
    assert {"I", "F", "I;16", "I;16B", "CMYK", "LAB", "YCbCr", "PA"} <= modes, modes
    responses = embed(app_config, readable)
    for response in responses:
        assert response.status_code == 200, response.text
    vectors = np.array([v for r in responses for v in r.json()["image_embeddings"]])  # [N, E]
    assert vectors.shape[0] == len(readable) and np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    unreadable = [blob for _, _, blob, reads in files if not reads]
    for response in embed(app_config, unreadable, chunk=1):
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == "images[0]"


def uint8_png(values: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(values.astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


def saved(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def test_high_bit_depth_is_scaled_to_eight_bits(app_config):
    """16-bit PPM, 16-bit PNG, 32-bit integer TIFF and float TIFF against the same values
    scaled in numpy: v/257 for 0..65535, v*255 for floats in 0..1, min-max otherwise."""
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 65536, (SIDE, SIDE))
    unit = rng.random((SIDE, SIDE), dtype=np.float32)
    signed = rng.integers(-(2**31), 2**31 - 1, (SIDE, SIDE)).astype(np.int32)
    low, high = float(signed.min()), float(signed.max())
    stretched = (signed - low) * 255 / (high - low)  # float64
    cases = [  # (file, the 8-bit pixels it must become)
        (saved(Image.fromarray(wide.astype(np.int32)), "PPM"), wide / 257),  # opens as I
        (saved(Image.fromarray(wide.astype(np.uint16)), "PNG"), wide / 257),  # I;16
        (saved(Image.fromarray(wide.astype(np.int32)), "TIFF"), wide / 257),  # I
        (saved(Image.fromarray(unit), "TIFF"), unit * 255.0),  # F
        (saved(Image.fromarray(signed), "TIFF"), stretched),  # I, beyond 16 bits
    ]
    (got,) = embed(app_config, [blob for blob, _ in cases])
    (want,) = embed(app_config, [uint8_png(np.rint(pixels)) for _, pixels in cases])
    assert got.status_code == want.status_code == 200, got.text
    similarity = cosines(got.json()["image_embeddings"], want.json()["image_embeddings"])
    assert similarity.min() >= MIN_COSINE, similarity
    clipped = np.minimum(wide, 255)  # what Pillow's own I;16 -> RGB gives: a different image
    (wrong,) = embed(app_config, [uint8_png(clipped)])
    assert cosines(got.json()["image_embeddings"][1:2], wrong.json()["image_embeddings"]) < 0.999


def test_pixels_no_view_can_show_are_a_422_naming_the_field(app_config):
    floats = np.ones((SIDE, SIDE), dtype=np.float32)
    floats[3, 4] = np.nan
    blobs = [uint8_png(np.zeros((4, 4))), saved(Image.fromarray(floats), "TIFF")]
    (response,) = embed(app_config, blobs)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "images[1]" and "not finite" in error["message"]
    with pytest.raises(InvalidImageError) as raised:  # a mode outside Image.MODES
        eight_bit(SimpleNamespace(mode="BGR;24"), "images[0]")
    assert raised.value.field == "images[0]"
