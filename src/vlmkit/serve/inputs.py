"""Turning request fields into model inputs, refusing bad ones with an `ApiError` that names the field.

Images arrive as base64 strings (optionally a `data:image/...;base64,` URL, what a browser's
FileReader gives). The pixel count is read from the header by a lazy `Image.open` and checked
before anything is decoded, so a decompression bomb (a small file that inflates to gigapixels)
costs nothing; the library's `bound_decoding` also caps each side and reduces a big JPEG on load.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import warnings

from vlmkit.data.formats import ImageOverLimits, bound_decoding
from vlmkit.data.limits import current_limits
from vlmkit.serve.errors import ApiError


def decode_image(data: str, field: str, max_pixels: int):
    """A base64 image string -> an RGB PIL image, or an ApiError naming `field` and the problem."""
    from PIL import Image

    if data.startswith("data:"):
        _, _, data = data.partition(",")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_image", f"{field} is not valid base64; send the image file's bytes base64-encoded") from None
    if not raw:
        raise ApiError(400, "invalid_image", f"{field} is empty; send the image file's bytes base64-encoded")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning: our own limit below decides
        try:
            image = Image.open(io.BytesIO(raw))  # reads the header only
        except Image.DecompressionBombError:
            raise ApiError(413, "image_too_large", f"{field} claims more pixels than PIL decodes safely (a decompression bomb?); "
                                                   f"the limit is {max_pixels} pixels") from None
        except (OSError, ValueError, SyntaxError, EOFError):
            raise ApiError(400, "invalid_image", f"{field} is not a readable image; send a PNG, JPEG, GIF, BMP or WebP file") from None
        # The library's bound (pixels and side, a big JPEG reduced on load), with the server's pixel limit
        limits = dataclasses.replace(current_limits(), max_image_pixels=max_pixels)
        try:
            bound_decoding(image, field, limits)
        except ImageOverLimits as error:
            width, height = error.size
            raise ApiError(413, "image_too_large", f"{field} is {width}x{height} = {width * height} pixels, over the limit "
                                                   f"of {max_pixels} pixels or {limits.max_image_side} a side; send a smaller image") from None
        try:
            image.load()  # decode now, inside the try: a truncated file fails here
            return image.convert("RGB")
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
            raise ApiError(400, "invalid_image", f"{field} cannot be decoded (truncated or corrupt); send a complete image file") from None


def check_text(text: str, field: str, max_chars: int) -> str:
    """`text`, refused when empty or longer than `max_chars`."""
    if not text.strip():
        raise ApiError(400, "invalid_request", f"{field} is empty; give some text")
    if len(text) > max_chars:
        raise ApiError(400, "limit_exceeded", f"{field} has {len(text)} characters, over the limit of {max_chars}; shorten it")
    return text


def check_count(items: list, field: str, limit: int, what: str = "items") -> list:
    """`items`, refused when empty or longer than `limit`."""
    if not items:
        raise ApiError(400, "invalid_request", f"{field} is empty; give at least one")
    if len(items) > limit:
        raise ApiError(400, "limit_exceeded", f"{field} has {len(items)} {what}, over the limit of {limit}; split the request")
    return items


def encode_png(pixels) -> str:
    """A (3, H, W) tensor with values in [0, 1] -> a base64 PNG string."""
    from PIL import Image

    array = (pixels.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())  # (H, W, 3) uint8
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
