"""A small typed client over the generated depthd.v1 stubs.

`DepthClient(target)` takes what a robot has at hand (a path, file bytes, a numpy
HxWxC uint8 array, a PIL image) and returns numpy depth maps with what they mean.
RPC failures raise `DepthdError`, which carries the gRPC status code; in a stream a
frame that failed comes back as a result with `error` set, and the stream goes on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import grpc
import numpy as np

from depthd_client.v1 import depth_pb2 as pb
from depthd_client.v1 import depth_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_MESSAGE_BYTES_CEILING = 2**31 - 1
"""The largest message gRPC can carry, and so the most a daemon's limits.max_message_bytes can be set
to. The client receives up to it, so that whatever the daemon is allowed to send, the client takes:
the daemon checks each reply against its own limit before any work."""

_ENCODINGS = {
    "float32": pb.DEPTH_ENCODING_FLOAT32,
    "float16": pb.DEPTH_ENCODING_FLOAT16,
    "uint16_mm": pb.DEPTH_ENCODING_UINT16_MM,
}
_DTYPES = {
    pb.DEPTH_ENCODING_UNSPECIFIED: np.dtype("<f4"),
    pb.DEPTH_ENCODING_FLOAT32: np.dtype("<f4"),
    pb.DEPTH_ENCODING_FLOAT16: np.dtype("<f2"),
    pb.DEPTH_ENCODING_UINT16_MM: np.dtype("<u2"),
}
_KIND_NAMES = {
    pb.DEPTH_KIND_UNSPECIFIED: "",
    pb.DEPTH_KIND_METRIC: "metric",
    pb.DEPTH_KIND_RELATIVE_DISPARITY: "relative_disparity",
    pb.DEPTH_KIND_RELATIVE_DEPTH: "relative_depth",
}
_FORMATS = {
    "rgb8": pb.PIXEL_FORMAT_RGB8,
    "bgr8": pb.PIXEL_FORMAT_BGR8,
    "rgba8": pb.PIXEL_FORMAT_RGBA8,
    "bgra8": pb.PIXEL_FORMAT_BGRA8,
    "gray8": pb.PIXEL_FORMAT_GRAY8,
}
_FORMATS_BY_CHANNELS = {1: ("gray8",), 3: ("rgb8", "bgr8"), 4: ("rgba8", "bgra8")}
_HEALTH = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class DepthdError(Exception):
    """An RPC failed. `code` is the grpc.StatusCode, `details` the daemon's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> "DepthdError":
        return cls(error.code(), error.details() or "")


@dataclass(frozen=True)
class Timing:
    queue_ms: float
    preprocess_ms: float
    inference_ms: float
    postprocess_ms: float
    total_ms: float
    batch_size: int


@dataclass(frozen=True)
class FrameError:
    code: grpc.StatusCode
    message: str


@dataclass(frozen=True)
class DepthResult:
    """One frame's answer. `depth` is HxW (float32, float16 or uint16 millimetres), None if the frame
    failed or was dropped. `kind` says what the values mean: "metric" (metres), "relative_disparity"
    (larger is nearer) or "relative_depth" (larger is farther)."""

    frame_id: int
    timestamp_ns: int
    model: str
    depth: np.ndarray | None
    kind: str
    min: float
    max: float
    timing: Timing | None
    visualization_png: bytes | None = None
    field_of_view_deg: float | None = None
    focal_length_px: float | None = None
    dropped: bool = False
    """A latest_frame_wins stream skipped this frame for a newer one."""
    error: FrameError | None = None
    stream_dropped: int = 0
    """Streams: frames of this stream dropped so far, when this result was sent."""

    @property
    def ok(self) -> bool:
        return self.error is None and not self.dropped

    def raise_for_error(self) -> "DepthResult":
        if self.error is not None:
            raise DepthdError(self.error.code, self.error.message)
        return self


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str
    architecture: str
    kind: str
    device: str
    dtype: str
    is_default: bool
    ready: bool
    demo: bool
    note: str
    frames_total: int
    frames_dropped: int
    batch_sizes: dict[int, int] = field(default_factory=dict)
    """Forward passes run per batch size since start: {frames in the pass: passes}."""
    max_batch: int = 0
    queue_peak: int = 0
    """The most frames waiting for this model at once since start."""
    max_processed_side: int = 0
    """Frames are processed at most this large (long side, pixels); larger ones are scaled down."""
    max_queue_bytes: int = 0
    bytes_held: int = 0
    """Bytes this model's frames and unsent replies hold in the daemon now, against max_queue_bytes."""
    bytes_peak: int = 0
    queue_depth: int = 0
    """Frames waiting for the model now."""


@dataclass(frozen=True)
class StreamFrame:
    """A frame for `stream` with its own id and capture time; plain images get their index and now."""

    image: Any
    frame_id: int | None = None
    timestamp_ns: int | None = None
    pixel_format: str | None = None


class DepthClient:
    """A connection to a depthd daemon: `"host:port"` or `"unix:///run/depthd/depthd.sock"`."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float = 30.0, channel: grpc.Channel | None = None):
        self.target = target
        self.timeout = timeout
        self._channel = channel or grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES_CEILING),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES_CEILING),
            ],
        )
        self._stub = depth_pb2_grpc.DepthEstimatorStub(self._channel)
        self._health_check = self._channel.unary_unary(
            "/grpc.health.v1.Health/Check", request_serializer=_health_request, response_deserializer=_health_status
        )
        self._health_watch = self._channel.unary_stream(
            "/grpc.health.v1.Health/Watch", request_serializer=_health_request, response_deserializer=_health_status
        )

    def __enter__(self) -> "DepthClient":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def estimate(
        self,
        image: Any,
        *,
        model: str = "",
        encoding: str = "float32",
        width: int = 0,
        height: int = 0,
        visualization: bool = False,
        colormap: str = "",
        pixel_format: str | None = None,
        frame_id: int = 0,
        timestamp_ns: int = 0,
        timeout: float | None = None,
    ) -> DepthResult:
        """Depth for one image: a path, encoded bytes, an HxW/HxWxC uint8 array or a PIL image."""
        request = build_request(
            image, model=model, encoding=encoding, width=width, height=height, visualization=visualization,
            colormap=colormap, pixel_format=pixel_format, frame_id=frame_id, timestamp_ns=timestamp_ns,
        )
        try:
            response = self._stub.Estimate(request, timeout=timeout or self.timeout)
        except grpc.RpcError as error:
            raise DepthdError.from_rpc(error) from None
        return to_result(response)

    def stream(
        self,
        frames: Iterable[Any],
        *,
        model: str = "",
        encoding: str = "float32",
        width: int = 0,
        height: int = 0,
        visualization: bool = False,
        colormap: str = "",
        latest_frame_wins: bool = False,
        timeout: float | None = None,
    ) -> Iterator[DepthResult]:
        """One result per frame, in order. Items are images or `StreamFrame`s. Stopping the
        iteration early cancels the stream."""

        def requests() -> Iterator[pb.EstimateRequest]:
            for index, item in enumerate(frames):
                frame = item if isinstance(item, StreamFrame) else StreamFrame(item)
                request = build_request(
                    frame.image, model=model, encoding=encoding, width=width, height=height,
                    visualization=visualization, colormap=colormap, pixel_format=frame.pixel_format,
                    frame_id=index if frame.frame_id is None else frame.frame_id,
                    timestamp_ns=time.time_ns() if frame.timestamp_ns is None else frame.timestamp_ns,
                )
                request.latest_frame_wins = latest_frame_wins
                yield request

        call = self._stub.EstimateStream(requests(), timeout=timeout)
        try:
            for response in call:
                yield to_result(response)
        except grpc.RpcError as error:
            raise DepthdError.from_rpc(error) from None
        finally:
            call.cancel()

    def models(self, timeout: float | None = None) -> list[ModelInfo]:
        try:
            response = self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout or self.timeout)
        except grpc.RpcError as error:
            raise DepthdError.from_rpc(error) from None
        return [
            ModelInfo(
                name=m.name, source=m.source, architecture=m.architecture, kind=_KIND_NAMES.get(m.kind, ""),
                device=m.device, dtype=m.dtype, is_default=m.is_default, ready=m.ready, demo=m.demo,
                note=m.note, frames_total=m.frames_total, frames_dropped=m.frames_dropped,
                batch_sizes=dict(sorted(m.batch_sizes.items())), max_batch=m.max_batch, queue_peak=m.queue_peak,
                max_processed_side=m.max_processed_side, max_queue_bytes=m.max_queue_bytes,
                bytes_held=m.bytes_held, bytes_peak=m.bytes_peak, queue_depth=m.queue_depth,
            )
            for m in response.models
        ]

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The standard gRPC health status: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN".
        `service` is "" (the daemon), "depthd.v1.DepthEstimator" or "depthd.v1.DepthEstimator/<model>"."""
        try:
            return _HEALTH.get(self._health_check(service, timeout=timeout or self.timeout), "UNKNOWN")
        except grpc.RpcError as error:
            if error.code() is grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise DepthdError.from_rpc(error) from None

    def wait_until_serving(self, timeout: float = 120.0, service: str = "") -> None:
        """Block until health says SERVING (models loaded and warm); DepthdError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DepthdError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{self.target} not SERVING after {timeout:g} s")
            try:
                for status in self._health_watch(service, timeout=left, wait_for_ready=True):
                    if status == 1:
                        return
            except grpc.RpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise DepthdError.from_rpc(error) from None
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


# --- messages ------------------------------------------------------------------------------------


def build_request(
    image: Any,
    *,
    model: str = "",
    encoding: str = "float32",
    width: int = 0,
    height: int = 0,
    visualization: bool = False,
    colormap: str = "",
    pixel_format: str | None = None,
    frame_id: int = 0,
    timestamp_ns: int = 0,
) -> pb.EstimateRequest:
    if encoding not in _ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(_ENCODINGS)}, got {encoding!r}")
    return pb.EstimateRequest(
        model=model,
        image=to_image(image, pixel_format),
        frame_id=frame_id,
        timestamp_ns=timestamp_ns,
        output=pb.OutputOptions(
            encoding=_ENCODINGS[encoding], width=width, height=height, visualization=visualization, colormap=colormap
        ),
    )


def to_image(image: Any, pixel_format: str | None = None) -> pb.Image:
    """A path, file bytes, a numpy uint8 array or a PIL image -> the Image message."""
    if isinstance(image, (str, Path)):
        return pb.Image(encoded=Path(image).read_bytes())
    if isinstance(image, (bytes, bytearray, memoryview)):
        return pb.Image(encoded=bytes(image))
    if type(image).__module__.startswith("PIL."):
        if image.mode not in ("RGB", "RGBA", "L"):
            image = image.convert("RGB")
        pixel_format = {"RGB": "rgb8", "RGBA": "rgba8", "L": "gray8"}[image.mode]
        image = np.asarray(image)
    if isinstance(image, np.ndarray):
        return pb.Image(raw=_raw(image, pixel_format))
    raise TypeError(f"cannot send a {type(image).__name__}: give a path, bytes, a numpy uint8 array or a PIL image")


def _raw(array: np.ndarray, pixel_format: str | None) -> pb.RawImage:
    if array.dtype != np.uint8:
        raise ValueError(f"a raw frame must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    channels = 1 if array.ndim == 2 else array.shape[2] if array.ndim == 3 else 0
    allowed = _FORMATS_BY_CHANNELS.get(channels, ())
    name = (pixel_format or (allowed[0] if allowed else "")).lower()
    if name not in allowed:
        raise ValueError(f"an array of shape {array.shape} cannot be sent as {pixel_format or 'a frame'}")
    return pb.RawImage(
        width=array.shape[1], height=array.shape[0], format=_FORMATS[name], data=np.ascontiguousarray(array).tobytes()
    )


def to_result(response: pb.EstimateResponse) -> DepthResult:
    error = None
    if response.HasField("error"):
        code = _STATUS_BY_NUMBER.get(response.error.code, grpc.StatusCode.UNKNOWN)
        error = FrameError(code, response.error.message)
    depth = None
    kind, lo, hi = "", 0.0, 0.0
    if response.HasField("depth"):
        d = response.depth
        depth = np.frombuffer(d.data, dtype=_DTYPES[d.encoding]).reshape(d.height, d.width).astype(
            _DTYPES[d.encoding].newbyteorder("="), copy=True
        )
        kind, lo, hi = _KIND_NAMES.get(d.kind, ""), d.min, d.max
    t = response.timing
    timing = None
    if response.HasField("timing"):
        timing = Timing(t.queue_ms, t.preprocess_ms, t.inference_ms, t.postprocess_ms, t.total_ms, t.batch_size)
    return DepthResult(
        frame_id=response.frame_id,
        timestamp_ns=response.timestamp_ns,
        model=response.model,
        depth=depth,
        kind=kind,
        min=lo,
        max=hi,
        timing=timing,
        visualization_png=response.visualization_png or None,
        field_of_view_deg=response.field_of_view_deg or None,
        focal_length_px=response.focal_length_px or None,
        dropped=response.dropped,
        error=error,
        stream_dropped=response.stream_dropped,
    )


# grpc.health.v1 is two one-field messages; encoding them here spares the client a dependency.


def _health_request(service: str) -> bytes:
    data = service.encode()
    return b"\x0a" + _varint(len(data)) + data if data else b""


def _health_status(data: bytes) -> int:
    position = 0
    while position < len(data):
        tag, position = _read_varint(data, position)
        if tag == 0x08:
            value, position = _read_varint(data, position)
            return value
        if tag & 7 == 0:
            _, position = _read_varint(data, position)
        elif tag & 7 == 2:
            length, position = _read_varint(data, position)
            position += length
        else:
            break
    return 0


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, position
