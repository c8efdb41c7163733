"""Where depthctl's frames come from: image files (a list, a folder, `-r` a folder tree, a glob), a video
file or a camera (PyAV, see `video`), each frame with a name that is unique within the source, and
`paced` to a fixed rate like a camera."""

from __future__ import annotations

import glob
import os
import time
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from depthd_client import video

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Frame:
    name: str
    """Unique within the source, a relative path without suffix ("left/000017"): output files are named after it."""
    image: bytes | np.ndarray
    """An image file's bytes, or a decoded video frame (HxWx3 RGB)."""
    timestamp_ns: int | None = None
    """A video frame's presentation time; None for a file (the client stamps it when it is sent)."""


class Source:
    """A finite or endless series of frames: `total` is the count where known, `fps` a video's own rate."""

    def __init__(self, frames: Iterable[Frame], total: int | None, fps: float | None = None, close=None):
        self._frames = frames
        self.total = total
        self.fps = fps
        self._close = close

    def __iter__(self) -> Iterator[Frame]:
        return iter(self._frames)

    def close(self) -> None:
        if self._close:
            self._close()


def open_source(source: str, recursive: bool = False) -> Source:
    """The frames of `source`: a video file or camera when its name says so, else image files.
    OSError when there is nothing to read."""
    if video.is_video(source):
        reader = video.VideoReader(source)
        stem = "camera" if video.is_camera(source) else Path(source).stem
        frames = (Frame(f"{stem}/{index:06d}", image, stamp) for index, (image, stamp) in enumerate(reader))
        return Source(frames, reader.info.frames, reader.info.fps, reader.close)
    paths = image_files(source, recursive)
    if not paths:
        hint = "" if recursive or not Path(source).is_dir() else " (-r searches its subfolders)"
        raise OSError(f"no images in {source}{hint}")
    return Source(file_frames(paths), len(paths))


def image_files(source: str, recursive: bool) -> list[Path]:
    if Path(source).is_dir():
        candidates: Iterable[Path] = Path(source).rglob("*") if recursive else Path(source).iterdir()
    else:
        candidates = (Path(p) for p in glob.glob(source, recursive=recursive))
    return sorted(p for p in candidates if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def file_frames(paths: list[Path]) -> Iterator[Frame]:
    """The files' bytes, read one at a time as the stream takes them."""
    for path, name in zip(paths, names(paths)):
        yield Frame(name, path.read_bytes())


def names(paths: list[Path]) -> list[str]:
    """Each file's path relative to the folder the files share, without its suffix ("a/f.jpg" -> "a/f"),
    so that two `f.jpg` in different folders never share an output. Files that differ only in their
    suffix keep it ("f.jpg", "f.png")."""
    if not paths:
        return []
    absolute = [Path(os.path.abspath(p)) for p in paths]
    root = Path(os.path.commonpath([p.parent for p in absolute]))
    relative = [p.relative_to(root) for p in absolute]
    stems = [str(r.with_suffix("")) for r in relative]
    shared = {stem for stem in stems if stems.count(stem) > 1}
    return [str(r) if stem in shared else stem for r, stem in zip(relative, stems)]


T = typing.TypeVar("T")


def paced(items: Iterable[T], fps: float, clock=time.monotonic, sleep=time.sleep) -> Iterator[T]:
    """`items` at `fps` at most, one per tick, like a camera: an item is held until its tick comes."""
    period = 1.0 / fps
    start = clock()
    for index, item in enumerate(items):
        wait = start + index * period - clock()
        if wait > 0:
            sleep(wait)
        yield item
