"""Frames in and pictures out, on the pool's threads: decode JPEG/PNG/WebP/BMP/TIFF or wrap raw buffers, encode PNGs.

Decoding refuses what would hurt the daemon before it allocates: the pixel count is
read from the file's header and checked against the limit before any pixel is
decoded, so a decompression bomb costs a header parse. Raw buffers are wrapped
without a copy; the engine converts their channel order on the model's device.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

from depthd.domain import Frame, PixelFormat
from depthd.errors import DepthdError, InvalidArgument, ResourceExhausted

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
"""What Pillow may open: no other decoder is exposed to the network."""


@dataclass(frozen=True)
class EncodedImage:
    """A compressed image file's bytes."""

    data: bytes


@dataclass(frozen=True)
class RawImage:
    """An uncompressed buffer: `height` rows of `width` pixels in `pixel_format`, no padding."""

    width: int
    height: int
    pixel_format: PixelFormat | None
    data: bytes


ImageSource = EncodedImage | RawImage


Admit = Callable[[int, int, int], None]
"""Called with (width, height, bytes the decoded pixels will take) once the header is read and
before any pixel is decoded: it raises to refuse the frame (an output or memory limit)."""


def decode(source: ImageSource, max_input_pixels: int, admit: Admit | None = None) -> Frame:
    """The frame's pixels, or a DepthdError saying why not: every decoder failure is the request's fault."""
    if isinstance(source, RawImage):
        return _wrap(source, max_input_pixels, admit)
    return _decode(source.data, max_input_pixels, admit)


def _wrap(raw: RawImage, max_input_pixels: int, admit: Admit | None) -> Frame:
    if raw.pixel_format is None:
        raise InvalidArgument(
            "image.raw.format: must be set to one of " + ", ".join(f"PIXEL_FORMAT_{f.name}" for f in PixelFormat)
        )
    if raw.width <= 0 or raw.height <= 0:
        raise InvalidArgument(f"image.raw: width and height must be positive, got {raw.width}x{raw.height}")
    _check_pixels(raw.width, raw.height, max_input_pixels, "image.raw")
    channels = raw.pixel_format.channels
    expected = raw.width * raw.height * channels
    if len(raw.data) != expected:
        raise InvalidArgument(
            f"image.raw.data: {len(raw.data)} bytes, but {raw.width}x{raw.height} {raw.pixel_format.name} "
            f"needs width x height x {channels} = {expected}"
        )
    if admit is not None:
        admit(raw.width, raw.height, 0)  # the pixels are the request's own bytes, wrapped
    shape = (raw.height, raw.width) if channels == 1 else (raw.height, raw.width, channels)
    pixels = np.frombuffer(raw.data, dtype=np.uint8).reshape(shape)
    return Frame(pixels, raw.pixel_format)


def _decode(data: bytes, max_input_pixels: int, admit: Admit | None) -> Frame:
    from PIL import Image, ImageOps

    if not data:
        raise InvalidArgument("image.encoded: empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ResourceExhausted(f"image.encoded: over the limit of {max_input_pixels} pixels ({error})") from error
    except Exception as error:  # noqa: BLE001 - Pillow raises OSError, ValueError, SyntaxError, struct.error, ...
        raise InvalidArgument(
            f"image.encoded: not a JPEG, PNG, WebP, BMP or TIFF image Pillow can read ({_reason(error)})"
        ) from error
    _check_pixels(image.width, image.height, max_input_pixels, "image.encoded")
    if admit is not None:
        # the decoded frame, and a converted copy while it is made (a palette, a 16-bit image)
        admit(image.width, image.height, image.width * image.height * 4)
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode == "L":
            return Frame(np.asarray(image), PixelFormat.GRAY8)
        if image.mode == "RGBA":
            return Frame(np.asarray(image), PixelFormat.RGBA8)
        return Frame(np.asarray(image.convert("RGB")), PixelFormat.RGB8)
    except DepthdError:
        raise
    except MemoryError as error:
        raise ResourceExhausted(f"image.encoded: not enough memory to decode a {image.width}x{image.height} image") from error
    except Exception as error:  # noqa: BLE001 - a damaged file fails in as many ways as Pillow has decoders
        raise InvalidArgument(f"image.encoded: the {image.format} data is damaged ({_reason(error)})") from error


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()[0][:120] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _check_pixels(width: int, height: int, max_input_pixels: int, field: str) -> None:
    if width * height > max_input_pixels:
        raise ResourceExhausted(
            f"{field}: {width}x{height} is {width * height} pixels, over the limit of {max_input_pixels}"
            " (limits.max_input_pixels)"
        )


def encode_png(pixels: np.ndarray, compress_level: int = 1) -> bytes:
    """uint8 HxW or HxWx3 -> PNG bytes. Level 1 because these are made per frame, on the hot path."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
