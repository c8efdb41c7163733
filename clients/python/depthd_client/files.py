"""Depth maps as files a user can open: .npy float32, 16-bit PNG, and the visualization PNG."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from depthd_client.messages import DepthResult, RequestOptions

FORMATS = ("npy", "png16", "vis")
SUFFIXES = {"npy": ".depth.npy", "png16": ".depth16.png", "vis": ".vis.png"}


def output_path(image: str | Path, folder: Path, form: str) -> Path:
    return folder / (Path(image).name.rsplit(".", 1)[0] + SUFFIXES[form])


def write(result: DepthResult, path: Path, form: str) -> None:
    """Write one result in the form it was requested for (see `request_options`)."""
    if form == "npy":
        np.save(path, result.depth.astype(np.float32, copy=False))
    elif form == "png16":
        write_png16(path, as_uint16(result))
    elif form == "vis":
        path.write_bytes(result.visualization_png or b"")
    else:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")


def request_options(form: str, metric: bool) -> RequestOptions:
    """What to ask the daemon for, to write `form`: millimetres for a metric png16."""
    if form == "png16" and metric:
        return {"encoding": "uint16_mm"}
    if form == "vis":
        return {"visualization": True}
    return {"encoding": "float32"}


def as_uint16(result: DepthResult) -> np.ndarray:
    """Millimetres for a metric map (as the daemon sent them); a relative map stretched to 0..65535."""
    depth = result.depth
    if depth.dtype == np.uint16:
        return depth
    depth = depth.astype(np.float64)
    span = result.max - result.min
    scaled = (depth - result.min) / span if span > 0 else np.zeros_like(depth)
    return np.clip(np.round(scaled * 65535), 0, 65535).astype(np.uint16)


def write_png16(path: Path, values: np.ndarray) -> None:
    """A 16-bit greyscale PNG, written with zlib alone so the client needs no imaging library."""
    height, width = values.shape
    rows = np.empty((height, 1 + 2 * width), dtype=np.uint8)
    rows[:, 0] = 0  # filter type: none
    rows[:, 1:] = values.astype(">u2").view(np.uint8).reshape(height, 2 * width)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
    path.write_bytes(png + chunk(b"IEND", b""))
