"""Frames in and pictures out: decode JPEG/PNG/WebP/BMP/TIFF or wrap raw buffers, encode PNGs.

Decoding refuses what would hurt the daemon before it allocates: the pixel count is
read from the file's header and checked against the limit before any pixel is
decoded, so a decompression bomb costs a header parse. Raw buffers are wrapped
without a copy; the engine converts their channel order on the model's device.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np

from depthd.domain import Frame, PixelFormat
from depthd.errors import InvalidArgument, ResourceExhausted

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
"""What Pillow may open: no other decoder is exposed to the network."""


@dataclass(frozen=True)
class Encoded:
    """A compressed image file's bytes."""

    data: bytes


@dataclass(frozen=True)
class Raw:
    """An uncompressed buffer: `height` rows of `width` pixels in `pixel_format`, no padding."""

    width: int
    height: int
    pixel_format: PixelFormat | None
    data: bytes


ImageSource = Encoded | Raw


@dataclass(frozen=True)
class FrameLimits:
    max_input_pixels: int = 40_000_000
    """Largest frame accepted, in pixels (width x height); an 8K frame is 33 million."""


def decode(source: ImageSource, limits: FrameLimits = FrameLimits()) -> Frame:
    if isinstance(source, Raw):
        return _wrap(source, limits)
    return _decode(source.data, limits)


def _wrap(raw: Raw, limits: FrameLimits) -> Frame:
    if raw.pixel_format is None:
        raise InvalidArgument(
            "image.raw.format: must be set to one of " + ", ".join(f"PIXEL_FORMAT_{f.name}" for f in PixelFormat)
        )
    if raw.width <= 0 or raw.height <= 0:
        raise InvalidArgument(f"image.raw: width and height must be positive, got {raw.width}x{raw.height}")
    _check_pixels(raw.width, raw.height, limits, "image.raw")
    channels = raw.pixel_format.channels
    expected = raw.width * raw.height * channels
    if len(raw.data) != expected:
        raise InvalidArgument(
            f"image.raw.data: {len(raw.data)} bytes, but {raw.width}x{raw.height} {raw.pixel_format.name} "
            f"needs width x height x {channels} = {expected}"
        )
    shape = (raw.height, raw.width) if channels == 1 else (raw.height, raw.width, channels)
    pixels = np.frombuffer(raw.data, dtype=np.uint8).reshape(shape)
    return Frame(pixels, raw.pixel_format)


def _decode(data: bytes, limits: FrameLimits) -> Frame:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise InvalidArgument("image.encoded: empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning, OSError) as error:
        if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            raise ResourceExhausted(
                f"image.encoded: over the limit of {limits.max_input_pixels} pixels ({error})"
            ) from error
        raise InvalidArgument(
            "image.encoded: not a JPEG, PNG, WebP, BMP or TIFF image Pillow can read"
        ) from error
    _check_pixels(image.width, image.height, limits, "image.encoded")
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode == "L":
            return Frame(np.asarray(image), PixelFormat.GRAY8)
        if image.mode == "RGBA":
            return Frame(np.asarray(image), PixelFormat.RGBA8)
        return Frame(np.asarray(image.convert("RGB")), PixelFormat.RGB8)
    except (OSError, ValueError, SyntaxError) as error:
        raise InvalidArgument(f"image.encoded: the {image.format} data is damaged ({error})") from error


def _check_pixels(width: int, height: int, limits: FrameLimits, field: str) -> None:
    if width * height > limits.max_input_pixels:
        raise ResourceExhausted(
            f"{field}: {width}x{height} is {width * height} pixels, over the limit of {limits.max_input_pixels}"
        )


def encode_png(pixels: np.ndarray, compress_level: int = 1) -> bytes:
    """uint8 HxW or HxWx3 -> PNG bytes. Level 1 because these are made per frame, on the hot path."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
