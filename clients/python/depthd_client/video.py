"""Video files and cameras through PyAV (FFmpeg), the client's optional `video` extra: frames read
from an mp4/mkv/avi/... file or a V4L2 camera (`/dev/video0`), and a visualization video written."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

SUFFIXES = {".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".wmv", ".flv"}
EXTRA = "pip install 'depthd-client[video]'"


def is_camera(source: str) -> bool:
    return source.startswith("/dev/video")


def is_video(source: str) -> bool:
    return is_camera(source) or Path(source).suffix.lower() in SUFFIXES


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise ImportError(f"video files and cameras need PyAV: {EXTRA}") from None
    return av


@dataclass(frozen=True)
class VideoInfo:
    frames: int | None
    """The container's frame count; None where it does not say (a camera, some files)."""
    fps: float | None


class VideoReader:
    """The frames of a video file or a camera, decoded one at a time as HxWx3 RGB uint8 arrays, each with
    its presentation time in nanoseconds (from the stream's start for a file; a camera's own clock)."""

    def __init__(self, source: str):
        av = _av()
        try:
            self._container = av.open(source, format="v4l2" if is_camera(source) else None)
        except av.FFmpegError as error:
            raise OSError(f"cannot open {source}: {error}") from None
        if not self._container.streams.video:
            self._container.close()
            raise OSError(f"no video stream in {source}")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.info = VideoInfo(self._stream.frames or None, float(rate) if rate else None)

    def __iter__(self) -> Iterator[tuple[np.ndarray, int | None]]:
        for frame in self._container.decode(self._stream):
            stamp = int(frame.time * 1e9) if frame.time is not None else None
            yield frame.to_ndarray(format="rgb24"), stamp

    def close(self) -> None:
        self._container.close()


class Mp4Writer:
    """An H.264 mp4 of RGB frames at a constant rate. Frames are scaled to the first frame's size,
    rounded down to even sides (what yuv420p needs)."""

    def __init__(self, path: Path, fps: float):
        av = _av()
        self.path = path
        self._av = av
        self._container = av.open(str(path), mode="w")
        self._rate = Fraction(fps).limit_denominator(1000)
        self._stream: Any = None

    def write(self, rgb: np.ndarray) -> None:
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        if self._stream is None:
            self._stream = self._container.add_stream("libx264", rate=self._rate)
            self._stream.width = max(2, rgb.shape[1] // 2 * 2)
            self._stream.height = max(2, rgb.shape[0] // 2 * 2)
            self._stream.pix_fmt = "yuv420p"
        frame = frame.reformat(width=self._stream.width, height=self._stream.height, format="yuv420p")
        self._container.mux(self._stream.encode(frame))

    def close(self) -> None:
        if self._stream is not None:
            self._container.mux(self._stream.encode(None))
        self._container.close()


def decode_png(png: bytes) -> np.ndarray:
    """A PNG (the daemon's visualization) as an HxWx3 RGB array, with FFmpeg's decoder: the client
    needs no imaging library for it."""
    av = _av()
    with av.open(io.BytesIO(png), format="png_pipe") as container:
        frame = next(container.decode(video=0))
        return frame.to_ndarray(format="rgb24")
