"""Depth maps as files a user can open (.npy float32, 16-bit PNG, the visualization PNG, a PLY point
cloud), and the hints CSV depthctl reads."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from depthd_client.messages import DepthResult, RequestOptions

FORMATS = ("npy", "png16", "vis", "ply")
SUFFIXES = {"npy": ".depth.npy", "png16": ".depth16.png", "vis": ".vis.png", "ply": ".ply"}


def output_path(name: str, folder: Path, form: str) -> Path:
    """Where the result of the frame called `name` (a relative path without suffix: `sources.names`) goes."""
    return folder / (name + SUFFIXES[form])


def write(result: DepthResult, path: Path, form: str, overwrite: bool = False) -> None:
    """Write one result in the form it was requested for (see `request_options`), making the folders it
    needs. FileExistsError for a file already there, unless `overwrite`."""
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists (--overwrite replaces it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    if form == "npy":
        np.save(path, result.depth.astype(np.float32, copy=False))
    elif form == "png16":
        write_png16(path, as_uint16(result))
    elif form == "vis":
        path.write_bytes(result.visualization_png or b"")
    elif form == "ply":
        if result.points is None:
            raise ValueError(f"no point cloud for {path.name}: the daemon sent none")
        write_ply(path, result.points, result.points_rgb)
    else:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")


def request_options(form: str, metric: bool) -> RequestOptions:
    """What to ask the daemon for, to write `form`: millimetres for a metric png16."""
    if form == "png16" and metric:
        return {"encoding": "uint16_mm"}
    if form == "vis":
        return {"visualization": True}
    if form == "ply":
        return {"point_cloud": True}
    return {"encoding": "float32"}


def as_uint16(result: DepthResult) -> np.ndarray:
    """Millimetres for a metric map (as the daemon sent them, or from metres, e.g. a relative model's map
    made metric by hints; 0 = no value); a relative map stretched to 0..65535."""
    depth = result.depth
    if depth.dtype == np.uint16:
        return depth
    depth = depth.astype(np.float64)
    if result.kind == "metric":
        millimetres = np.where(np.isfinite(depth), np.round(depth * 1000.0), 0.0)
        return np.clip(millimetres, 0, 65535).astype(np.uint16)
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


PLY_COMMENT = "depthd point cloud: metres, camera optical frame (x right, y down, z forward)"


def write_ply(path: Path, points: np.ndarray, rgb: np.ndarray | None = None) -> int:
    """A binary little-endian PLY of the finite points of an HxWx3 (or Nx3) cloud, with their uint8 colours
    (red, green, blue) when `rgb` is given: points without a depth (NaN) are left out, since viewers choke
    on them. Returns the number of points written."""
    xyz = np.asarray(points, dtype="<f4").reshape(-1, 3)
    keep = np.isfinite(xyz).all(axis=1)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if rgb is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    vertices = np.empty(int(keep.sum()), dtype=np.dtype(fields))
    for axis, name in enumerate("xyz"):
        vertices[name] = xyz[keep, axis]
    if rgb is not None:
        colours = np.asarray(rgb, dtype=np.uint8).reshape(-1, 3)[keep]
        for channel, name in enumerate(("red", "green", "blue")):
            vertices[name] = colours[:, channel]
    types = {"<f4": "float", "u1": "uchar"}
    header = ["ply", "format binary_little_endian 1.0", f"comment {PLY_COMMENT}", f"element vertex {len(vertices)}"]
    header += [f"property {types[kind]} {name}" for name, kind in fields]
    header.append("end_header\n")
    path.write_bytes("\n".join(header).encode("ascii") + vertices.tobytes())
    return len(vertices)


def read_hints(path: str | Path) -> np.ndarray:
    """The hints of a CSV file, as an Nx3 float64 array: a line `x,y,depth_m` each (pixels of the input
    image, metres), blank lines skipped; a first line without any number is a header. ValueError naming the
    file and line for a line that is not three numbers; OSError when the file cannot be read."""
    rows: list[list[float | None]] = []
    header_allowed = True
    for number, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        values = [_number(cell) for cell in line.split(",")]
        if header_allowed:
            header_allowed = False
            if all(value is None for value in values):
                continue
        if len(values) != 3 or None in values:
            raise ValueError(f"{path}:{number}: expected x,y,depth_m (three numbers), got {line.strip()!r}")
        rows.append(values)
    return np.array(rows, dtype=np.float64).reshape(-1, 3)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
