"""Base64 images in request bodies -> PIL images and uint8 arrays, refused with a one-line
reason (never an exception the app turns into a 500): bad base64, not an image, too large.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from sdjax import tasks
from sdjax.serve.limits import BadRequest


def open_image(data: str, field: str) -> Image.Image:
    """A base64 image, with or without a ``data:image/...;base64,`` prefix, opened lazily
    (the pixels are not decoded yet, so its size can be checked first)."""
    data = data.strip()
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        return Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    except Image.DecompressionBombError:
        raise BadRequest(f"{field}: the image is far too large") from None
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
        raise BadRequest(f"{field}: not a base64-encoded image") from None


def decode(data: str, field: str, max_pixels: int, *, mask: bool = False) -> np.ndarray:
    """uint8 (H, W, 3), or (H, W) grayscale for a mask, from a base64 image no larger than
    ``max_pixels``. The size is checked before decoding, so a huge image costs nothing."""
    image = open_image(data, field)
    w, h = image.size
    if w * h > max_pixels:
        raise BadRequest(f"{field}: {w}x{h} is more than this server's limit of {max_pixels} "
                         "pixels per image")
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError):
        raise BadRequest(f"{field}: the image data is truncated or corrupt") from None
    return tasks.to_gray(image) if mask else tasks.to_rgb(image)[0]
