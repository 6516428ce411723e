"""Index-time thumbnails: a small JPEG of an image item, stored in its payload as a data URI so
a result page (`/ui`) can show what matched without the server keeping the files.

Bounded twice: the largest side (the server's `thumbnail_max_side`, or less when the request
asks) and the encoded size (`thumbnail_max_bytes`, under the wire's payload limit); the JPEG
quality steps down until it fits, and a thumbnail that never fits is refused naming the limit.
"""

from __future__ import annotations

import base64
import io

from PIL import Image

from server.exceptions import ImageTooLargeError, InvalidRequestError
from server.inputs import Limits, eight_bit, open_image

PAYLOAD_KEY = "thumbnail"
QUALITIES = (85, 70, 55, 40, 30)


def wanted_side(asked: bool | int | None, default: bool | int, limits: Limits, field: str):
    """The side in pixels one item asks for (None: no thumbnail); over the limit is a 413."""
    choice = default if asked is None else asked
    if choice is False:
        return None
    side = limits.thumbnail_max_side if choice is True else int(choice)
    if side > limits.thumbnail_max_side:
        raise ImageTooLargeError(
            f"{field}: a {side}-pixel thumbnail; the limit is "
            f"{limits.thumbnail_max_side} pixels (thumbnail_max_side)",
            field,
        )
    return side


def thumbnail_uri(blob: bytes, side: int, limits: Limits, field: str) -> str:
    """A `data:image/jpeg;base64,...` of the image, its largest side at most `side`."""
    image = eight_bit(open_image(blob, limits.max_image_pixels, field), field)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        base = Image.new("RGB", image.size, "white")  # JPEG has no alpha: lay it on white
        base.paste(image.convert("RGBA"), mask=image.convert("RGBA"))
        image = base
    image = image.convert("RGB")
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    for quality in QUALITIES:
        out = io.BytesIO()
        image.save(out, "JPEG", quality=quality, optimize=True)
        if out.tell() <= limits.thumbnail_max_bytes:
            return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")
    raise ImageTooLargeError(
        f"{field}: its thumbnail takes {out.tell()} bytes at JPEG quality {QUALITIES[-1]}; "
        f"the limit is {limits.thumbnail_max_bytes} bytes (thumbnail_max_bytes)",
        field,
    )


def check_free(payload: dict, field: str) -> None:
    if PAYLOAD_KEY in payload:
        raise InvalidRequestError(
            f"{field}.payload.{PAYLOAD_KEY}: the server writes this key when a thumbnail is "
            f"asked for; rename yours or ask for none",
            f"{field}.payload.{PAYLOAD_KEY}",
        )
