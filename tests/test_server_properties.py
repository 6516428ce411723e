"""Property tests (hypothesis): artifact reading and request decoding never fail unexpectedly.

Whatever bytes arrive, the answer is a value or our own error (ArtifactError -> 422, ApiError
-> 4xx naming the field): never another exception, which would be a 500.
"""

from __future__ import annotations

import base64
import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from export import ArtifactError, read_artifact
from server.errors import ApiError
from server.inputs import Limits, decode_base64, open_image, text_rows
from tests.server_helpers import export_artifacts

LIMITS = Limits(max_items=8, max_image_pixels=1_000_000, max_text_chars=500, image_size=32,
                context_length=77)  # fmt: skip
FAST = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def artifact_bytes(tiny_runs, tmp_path_factory) -> bytes:
    files = export_artifacts(tiny_runs, tmp_path_factory.mktemp("artifacts"))
    return files["lpi"][0].read_bytes()


@FAST
@given(data=st.data())
def test_a_damaged_artifact_is_refused_or_reads_the_same_tensors(
    artifact_bytes, tmp_path_factory, data
):
    original = bytearray(artifact_bytes)
    damaged = bytearray(original)
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            at = data.draw(st.integers(0, len(damaged) - 1))
            damaged[at] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        damaged = damaged[: data.draw(st.integers(0, len(damaged) - 1))]
    else:
        at = data.draw(st.integers(0, len(damaged)))
        damaged[at:at] = data.draw(st.binary(min_size=1, max_size=64))
    path = tmp_path_factory.mktemp("damaged") / "task.safetensors"
    path.write_bytes(bytes(damaged))
    reference = read_artifact(_write(tmp_path_factory, artifact_bytes))
    try:
        artifact = read_artifact(path)
    except ArtifactError:
        return
    # Accepted: then only metadata outside the checksum can differ; every tensor is intact.
    for tower in ("image", "text"):
        got, want = getattr(artifact.folded, tower), getattr(reference.folded, tower)
        assert torch.equal(got.key_u, want.key_u) and torch.equal(got.value_m, want.value_m)


def _write(factory, data: bytes):
    path = factory.mktemp("good") / "task.safetensors"
    path.write_bytes(data)
    return path


@FAST
@given(text=st.text(max_size=200))
def test_base64_decoding_returns_bytes_or_names_the_field(text):
    try:
        decoded = decode_base64(text, "images[0]")
    except ApiError as err:
        assert err.status == 422 and err.field == "images[0]"
        return
    assert isinstance(decoded, bytes)


@FAST
@given(blob=st.binary(max_size=64))
def test_base64_round_trips_in_both_alphabets(blob):
    assert decode_base64(base64.b64encode(blob).decode(), "x") == blob
    unpadded = base64.urlsafe_b64encode(blob).decode().rstrip("=")
    assert decode_base64(unpadded, "x") == blob


@FAST
@given(blob=st.binary(max_size=2048))
def test_arbitrary_bytes_are_an_image_or_a_4xx(blob):
    try:
        image = open_image(blob, LIMITS.max_image_pixels, "images[3]")
    except ApiError as err:
        assert 400 <= err.status < 500 and err.field == "images[3]"
        return
    assert image.width * image.height <= LIMITS.max_image_pixels


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    size=st.tuples(st.integers(1, 300), st.integers(1, 300)),
    mode=st.sampled_from(["RGB", "L", "RGBA", "P", "1", "I;16"]),
    fmt=st.sampled_from(["PNG", "GIF", "BMP", "TIFF", "WEBP"]),
    cut=st.integers(0, 200),
)
def test_real_and_truncated_images(size, mode, fmt, cut):
    out = io.BytesIO()
    try:
        Image.new(mode, size).save(out, fmt)
    except (OSError, ValueError, KeyError):  # this format cannot hold this mode
        return
    blob = out.getvalue()
    blob = blob[: max(1, len(blob) - cut)] if cut else blob
    try:
        open_image(blob, LIMITS.max_image_pixels, "images[0]")
    except ApiError as err:
        assert err.status in (413, 422) and err.field == "images[0]"


@FAST
@given(texts=st.lists(st.text(max_size=600), min_size=1, max_size=4))
def test_texts_become_rows_ending_at_end_of_text_or_a_4xx(texts):
    fields = [f"texts[{i}]" for i in range(len(texts))]
    try:
        rows = text_rows(texts, LIMITS, fields)
    except ApiError as err:
        assert err.status in (413, 422) and err.field in fields
        return
    for row in rows:
        assert 2 <= row.shape[0] <= LIMITS.context_length
        assert int(row[-1]) == int(row.max())  # the end-of-text id, the highest, closes it
