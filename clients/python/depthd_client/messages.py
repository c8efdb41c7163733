"""What goes to depthd and what comes back, without any I/O: the request options, the result types,
their conversion to and from the depthd.v1 and grpc.health.v1 messages, and error conversion. The
sync client (`client.py`) and the asyncio client (`aio.py`) share all of it, and only do the calls.

Each request option is defined once, in `RequestOptions` (or `StreamOptions`, the part of it that
holds for a whole stream), and turned into the message in one place, `_output` or `_request`; both
clients and `build_request` take it from there. Numpy frames are RGB unless `pixel_format` says otherwise.
The geometry travels both ways: a camera (`CameraIntrinsics`) and true depths at a few pixels (hints)
go out, and the camera used, an organized point cloud and the fit to the hints (`Alignment`) come back.
"""

from __future__ import annotations

import collections
import numbers
import sys
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypedDict, Union, get_args

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from depthd_client.v1 import depth_pb2 as pb

if sys.version_info >= (3, 11):  # re-exported ("as") for the clients' signatures
    from typing import Unpack as Unpack
else:
    from typing_extensions import Unpack as Unpack

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_MESSAGE_BYTES_CEILING = 2**31 - 1
"""The largest message gRPC can carry, and so the most a daemon's limits.max_message_bytes can be set
to. The client receives up to it, so that whatever the daemon is allowed to send, the client takes:
the daemon checks each reply against its own limit before any work."""

Encoding = Literal["float32", "float16", "uint16_mm"]
"""How depth values travel: little-endian float32, float16, or uint16 millimetres (metric models only)."""
PixelFormat = Literal["rgb8", "bgr8", "rgba8", "bgra8", "gray8"]
"""The channel order of a raw (numpy or buffer) frame; alpha is ignored."""
Colormap = Literal["gray", "turbo", "inferno"]
"""The colours of the visualization PNG; the daemon's default is gray."""
DepthKind = Literal["metric", "relative_disparity", "relative_depth"]
"""What depth values mean: metres; inverse depth up to scale and shift (larger is nearer);
depth up to scale (larger is farther)."""
HealthStatus = Literal["SERVING", "NOT_SERVING", "SERVICE_UNKNOWN", "UNKNOWN"]
"""A status of the standard grpc.health.v1 service."""

ImageLike = Any
"""A path (str or Path), encoded file bytes (JPEG, PNG, WebP, BMP, TIFF), an HxW or HxWxC uint8
numpy array (RGB unless `pixel_format` says otherwise), or a PIL image."""


@dataclass(frozen=True)
class CameraIntrinsics:
    """A pinhole camera (no distortion) in pixels of the image it belongs to, pixel centres at whole
    coordinates (the top-left pixel's centre is 0, 0), as in OpenCV and ROS's CameraInfo."""

    fx: float
    fy: float
    cx: float
    cy: float


@dataclass(frozen=True)
class Alignment:
    """How a map was fitted to the request's hints: metric = scale * relative + shift (in inverse depth for
    a relative disparity model; a metric model is corrected by a scale alone). Under 3 `hints_used`: no fit,
    the map is as the model gave it. `hints_rejected`: outside the image, not finite, not positive, or
    outliers of the fit. `rmse_m`: of the fitted depth at the hints used, in metres."""

    scale: float
    shift: float
    hints_used: int
    hints_rejected: int
    rmse_m: float


IntrinsicsLike = Union[CameraIntrinsics, Sequence[float], np.ndarray]
"""A camera: a `CameraIntrinsics`, or (fx, fy, cx, cy) as any sequence of 4 numbers (a numpy array too),
in pixels of the input image."""
HintsLike = Union[Iterable[Sequence[float]], np.ndarray]
"""True depths at a few pixels of the input image: (x, y, depth_m) triples (column, row, metres along the
optical axis), as an iterable of 3-sequences or an Nx3 numpy array."""


class StreamOptions(TypedDict, total=False):
    """The options that hold for every frame of a stream, and for a single request.
    Leave one out for the daemon's default."""

    model: str
    """A name from `models()`; the daemon's default model if left out."""
    encoding: Encoding
    """Of the returned depth map; float32 if left out."""
    width: int
    """Of the depth map; the input's (or kept to its aspect ratio if height is given) if left out."""
    height: int
    """Of the depth map; the input's (or kept to its aspect ratio if width is given) if left out."""
    visualization: bool
    """Also return an 8-bit PNG of the map, near = bright."""
    colormap: Colormap
    """Of the visualization."""
    pixel_format: PixelFormat
    """Of a numpy frame: rgb8 (3 channels), rgba8 (4) or gray8 (2-D) if left out."""
    vis_min: float
    """With vis_max: the visualization's fixed colour range, in the map's unit, so that a stream's colours
    do not flicker; both left out (or 0): each frame's own min and max."""
    vis_max: float
    point_cloud: bool
    """Also return the map as an organized point cloud (`DepthResult.points`), metres in the camera's
    optical frame. The daemon needs metric depth (a metric model, or `hints`) and a camera (`intrinsics`,
    the model's config, or Depth Pro's own focal length); else INVALID_ARGUMENT."""
    point_stride: int
    """Of the point cloud: every n-th row and column of the map; 0 or 1 = every pixel."""
    point_cloud_rgb: bool
    """With point_cloud: also the input frame's colour of each point (`DepthResult.points_rgb`)."""
    intrinsics: IntrinsicsLike
    """The camera, in pixels of the input image: a `CameraIntrinsics` or (fx, fy, cx, cy). Left out: the
    model's configured camera, if any. In a stream, for every frame (a `StreamFrame` may bring its own)."""
    stabilize: bool
    """Streams, relative models: align each frame's scale and shift to the stream's running reference, so
    the map does not flicker. A single request (`estimate`) refuses it."""


class RequestOptions(StreamOptions, total=False):
    """The options of one request: those of `StreamOptions`, the frame's own id and capture time, both
    echoed in the result, and its hints. In a stream a frame carries these in its `StreamFrame`."""

    frame_id: int
    timestamp_ns: int
    hints: HintsLike
    """True depths at a few pixels, (x, y, depth_m) each: with at least 3 usable ones the map is made
    metric (a relative model) or corrected (a metric one); see `DepthResult.alignment`."""


class DepthdError(Exception):
    """An RPC failed. `code` is the grpc.StatusCode, `details` the daemon's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> DepthdError:
        """The error of a failed call, sync or asyncio (`grpc.aio.AioRpcError` is a `grpc.RpcError`)."""
        return cls(error.code(), error.details() or "")


class Retries:
    """One call's (or one stream's) retries under a client's opt-in `reconnect`: the call waits for the
    daemon to be reachable (`wait_for_ready`), and a call answered UNAVAILABLE (a daemon stopping,
    restarting, still loading its models) is made again after a pause that doubles up to a second,
    until `timeout` seconds from now (None: no end)."""

    FIRST_PAUSE_S = 0.05
    LONGEST_PAUSE_S = 1.0

    def __init__(self, enabled: bool, timeout: float | None):
        self.enabled = enabled
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._pause = self.FIRST_PAUSE_S

    @property
    def wait_for_ready(self) -> bool | None:
        """gRPC's per-call flag: True waits for the daemon to be reachable; None keeps gRPC's default."""
        return True if self.enabled else None

    def left(self) -> float | None:
        """The seconds left to the deadline, for the next attempt's own timeout."""
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.001)

    def after(self, error: DepthdError) -> float | None:
        """Seconds to wait before trying again after `error`, or None: give up and raise it."""
        pause = self._pause
        if not self.enabled or error.code is not grpc.StatusCode.UNAVAILABLE:
            return None
        if self._deadline is not None and time.monotonic() + pause >= self._deadline:
            return None
        self._pause = min(pause * 2, self.LONGEST_PAUSE_S)
        return pause

    def succeeded(self) -> None:
        self._pause = self.FIRST_PAUSE_S


@contextmanager
def rpc_errors() -> Iterator[None]:
    """Around a call, sync or asyncio: a failed RPC raises DepthdError with its status code."""
    try:
        yield
    except grpc.RpcError as error:
        raise DepthdError.from_rpc(error) from None


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
    (larger is nearer) or "relative_depth" (larger is farther); "" when there is no map."""

    frame_id: int
    timestamp_ns: int
    model: str
    depth: np.ndarray | None
    kind: DepthKind | Literal[""]
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
    points: np.ndarray | None = None
    """With point_cloud: an organized HxWx3 float32 cloud (every point_stride-th row and column of the
    map), x right, y down, z forward, metres, in the camera's optical frame; NaN where the depth is not
    valid."""
    points_rgb: np.ndarray | None = None
    """With point_cloud_rgb: HxWx3 uint8, each point's colour (R, G, B) from the input frame."""
    intrinsics: CameraIntrinsics | None = None
    """The camera the daemon used, scaled to the returned map; None when it knew none."""
    alignment: Alignment | None = None
    """How the map was fitted to the request's hints; None without hints."""

    @property
    def ok(self) -> bool:
        return self.error is None and not self.dropped

    def raise_for_error(self) -> DepthResult:
        if self.error is not None:
            raise DepthdError(self.error.code, self.error.message)
        return self


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str
    architecture: str
    kind: DepthKind | Literal[""]
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
    input_size: int = 0
    """The processed short side (pixels) at the model's size; 0: frames are processed at their own size."""
    backend: str = ""
    """What runs the network: torch, openvino or onnxruntime."""


@dataclass(frozen=True)
class StreamFrame:
    """A frame for `stream` with its own id, capture time, pixel format, camera or hints; a plain image
    gets its index in the stream, the time it is sent, and the stream's pixel format and camera. Numpy
    frames are RGB unless `pixel_format` says otherwise. Every field but `image` is a `RequestOptions`
    key, and overrides the stream's options for this frame."""

    image: ImageLike
    frame_id: int | None = None
    timestamp_ns: int | None = None
    pixel_format: PixelFormat | None = None
    intrinsics: IntrinsicsLike | None = None
    hints: HintsLike | None = None
    """This frame's true depths at a few pixels (x, y, depth_m), e.g. from a LiDAR: see `RequestOptions`."""


Frames = Union[Iterable[Union[ImageLike, StreamFrame]], AsyncIterable[Union[ImageLike, StreamFrame]]]
"""What `stream` takes: images or `StreamFrame`s, from a sync iterable (and, for the asyncio client,
an async one)."""


# --- requests ------------------------------------------------------------------------------------

_ENCODINGS = {name: pb.DepthEncoding.Value(f"DEPTH_ENCODING_{name.upper()}") for name in get_args(Encoding)}
_FORMATS = {name: pb.PixelFormat.Value(f"PIXEL_FORMAT_{name.upper()}") for name in get_args(PixelFormat)}
_PIL_FORMATS: dict[str, PixelFormat] = {"RGB": "rgb8", "RGBA": "rgba8", "L": "gray8"}
_FORMATS_BY_CHANNELS: dict[int, tuple[PixelFormat, ...]] = {1: ("gray8",), 3: ("rgb8", "bgr8"), 4: ("rgba8", "bgra8")}
_STREAM_KEYS = StreamOptions.__required_keys__ | StreamOptions.__optional_keys__
_REQUEST_KEYS = RequestOptions.__required_keys__ | RequestOptions.__optional_keys__


def build_request(image: ImageLike, **options: Unpack[RequestOptions]) -> pb.EstimateRequest:
    """The EstimateRequest for one image (see `ImageLike`; numpy frames are RGB unless `pixel_format`
    says otherwise), `stabilize` included (for a stream of your own). An unknown option is a TypeError,
    a bad value a ValueError."""
    check_options(options, "build_request")
    return _request(image, options, _output(options))


def make_request(image: ImageLike, options: RequestOptions, caller: str) -> pb.EstimateRequest:
    """The request of a single call (`estimate`): `build_request`'s, with the caller's name in its errors,
    and `stabilize` refused, since it needs a stream's earlier frames."""
    check_options(options, caller)
    if options.get("stabilize"):
        raise ValueError(f"{caller}(): stabilize aligns a stream's frames to each other; use stream()")
    return _request(image, options, _output(options))


def check_options(options: Mapping[str, object], caller: str, *, stream: bool = False) -> None:
    """TypeError naming an unknown option, as Python names an unexpected keyword argument; ValueError
    for a pixel format or a camera that is not one (a stream's are checked before it opens)."""
    allowed = _STREAM_KEYS if stream else _REQUEST_KEYS
    for name in options:
        if name not in allowed:
            hint = "; a stream's frame carries it in its StreamFrame" if name in _REQUEST_KEYS else ""
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}{hint}")
    pixel_format = options.get("pixel_format")
    if pixel_format is not None and str(pixel_format).lower() not in _FORMATS:
        raise ValueError(f"pixel_format must be one of {', '.join(_FORMATS)}, got {pixel_format!r}")
    to_intrinsics(options.get("intrinsics"))


def _output(options: StreamOptions) -> pb.OutputOptions:
    """The output options of a request, or of every request of a stream."""
    encoding = options.get("encoding", "float32")
    if encoding not in _ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(_ENCODINGS)}, got {encoding!r}")
    return pb.OutputOptions(
        encoding=_ENCODINGS[encoding],
        width=options.get("width", 0),
        height=options.get("height", 0),
        visualization=options.get("visualization", False),
        colormap=options.get("colormap", ""),
        vis_min=options.get("vis_min", 0.0),
        vis_max=options.get("vis_max", 0.0),
        point_cloud=options.get("point_cloud", False),
        point_stride=options.get("point_stride", 0),
        point_cloud_rgb=options.get("point_cloud_rgb", False),
    )


def _request(image: ImageLike, options: RequestOptions, output: pb.OutputOptions) -> pb.EstimateRequest:
    return pb.EstimateRequest(
        model=options.get("model", ""),
        image=to_image(image, options.get("pixel_format")),
        frame_id=options.get("frame_id", 0),
        timestamp_ns=options.get("timestamp_ns", 0),
        output=output,
        intrinsics=to_intrinsics(options.get("intrinsics")),
        hints=to_hints(options.get("hints")),
        stabilize=options.get("stabilize", False),
    )


def to_intrinsics(intrinsics: IntrinsicsLike | None) -> pb.CameraIntrinsics | None:
    """A `CameraIntrinsics` or (fx, fy, cx, cy) -> the message (None for None). Only the shape is checked
    here: whether the numbers make a camera (fx > 0, ...) is the daemon's to say (INVALID_ARGUMENT)."""
    if intrinsics is None:
        return None
    if isinstance(intrinsics, CameraIntrinsics):
        intrinsics = (intrinsics.fx, intrinsics.fy, intrinsics.cx, intrinsics.cy)
    fx, fy, cx, cy = _numbers(intrinsics, 4, "intrinsics", "(fx, fy, cx, cy)")
    return pb.CameraIntrinsics(fx=fx, fy=fy, cx=cx, cy=cy)


def to_hints(hints: HintsLike | None) -> list[pb.DepthHint]:
    """(x, y, depth_m) triples, or an Nx3 array -> DepthHint messages. Only the shape is checked here: hints
    outside the image, not finite or not positive are the daemon's to reject (and count)."""
    if hints is None:
        return []
    if isinstance(hints, np.ndarray):
        if hints.size and (hints.ndim != 2 or hints.shape[1] != 3 or hints.dtype.kind not in "biuf"):
            raise ValueError(f"hints must be an Nx3 array of numbers (x, y, depth_m), got {hints.dtype} {hints.shape}")
        return [pb.DepthHint(x=x, y=y, depth_m=d) for x, y, d in hints.reshape(-1, 3).tolist()]
    if isinstance(hints, (str, bytes)) or not isinstance(hints, Iterable):
        raise ValueError(f"hints must be (x, y, depth_m) triples or an Nx3 array, got {type(hints).__name__}")
    triples = (_numbers(hint, 3, f"hints[{index}]", "(x, y, depth_m)") for index, hint in enumerate(hints))
    return [pb.DepthHint(x=x, y=y, depth_m=d) for x, y, d in triples]


def _numbers(values: object, count: int, name: str, form: str) -> tuple[float, ...]:
    """`values` as `count` floats; ValueError naming `name` and its `form` if it is not `count` numbers."""
    if isinstance(values, np.ndarray) and values.ndim == 1:
        values = values.tolist()
    if (
        not isinstance(values, Sequence)
        or isinstance(values, (str, bytes))
        or len(values) != count
        or not all(isinstance(value, numbers.Real) for value in values)
    ):
        raise ValueError(f"{name} must be {count} numbers {form}, got {values!r}")
    return tuple(float(value) for value in values)


class StreamRequests:
    """The request side of one stream. The stream's options are checked, and its output options built,
    once, when the stream is opened; each frame's request adds the frame's own (`StreamFrame`).

    A frame that cannot be sent, or a frame source that raises, ends the requests there: the daemon
    answers the frames before it, and then `reading` raises that error, the same exception in the sync
    and the asyncio client (gRPC itself would log it and cancel the call, with a different code in each).
    """

    _FRAME_OPTIONS = tuple(f.name for f in fields(StreamFrame) if f.name != "image")

    def __init__(self, options: StreamOptions, latest_frame_wins: bool):
        check_options(options, "stream", stream=True)
        self._options = options
        self._output = _output(options)
        self._latest_frame_wins = latest_frame_wins
        self._sent = 0
        self._error: Exception | None = None
        self._unanswered: collections.deque[tuple[int, int, int]] = collections.deque()
        """(call, frame_id, timestamp_ns) of each frame sent and not yet answered, oldest first."""
        self.exhausted = False
        """The frames ran out (or raised): no stream needs to be opened again for them."""
        self._taking = threading.Lock()
        self._call = 0
        self._carried: list[ImageLike | StreamFrame] = []
        self._broken_by: DepthdError | None = None

    def request(self, item: ImageLike | StreamFrame) -> pb.EstimateRequest:
        frame = item if isinstance(item, StreamFrame) else StreamFrame(item)
        options: dict[str, Any] = dict(self._options)
        options.update((name, value) for name in self._FRAME_OPTIONS if (value := getattr(frame, name)) is not None)
        options.setdefault("frame_id", self._sent)
        if "timestamp_ns" not in options:
            options["timestamp_ns"] = time.time_ns()
        request = _request(frame.image, options, self._output)  # type: ignore[arg-type]
        request.latest_frame_wins = self._latest_frame_wins
        self._sent += 1
        self._unanswered.append((self._call, request.frame_id, request.timestamp_ns))
        return request

    def answered(self) -> list[DepthResult]:
        """Count one response of the open call. Returns the frames an earlier, broken call took but never
        answered, if any were left behind (a frame taken as the call broke): their results come first."""
        lost = []
        while self._unanswered and self._unanswered[0][0] != self._call:
            lost.append(self._lost(self._unanswered.popleft()))
        if self._unanswered:
            self._unanswered.popleft()
        return lost

    def broke(self, error: DepthdError) -> list[DepthResult]:
        """The open call broke: a result with `error` for each frame it took and did not answer, in order,
        so there is one result per frame even across a reconnect. The call stops taking frames; a frame
        it was waiting for goes to the next call."""
        self._broken_by = error
        self._call += 1
        lost = []
        while self._unanswered:
            lost.append(self._lost(self._unanswered.popleft()))
        return lost

    def _lost(self, entry: tuple[int, int, int]) -> DepthResult:
        _, frame_id, timestamp_ns = entry
        error = self._broken_by or DepthdError(grpc.StatusCode.UNAVAILABLE, "")
        message = f"the stream broke before this frame was answered ({error.details or error.code.name})"
        return DepthResult(frame_id, timestamp_ns, "", None, "", 0.0, 0.0, None, error=FrameError(error.code, message))

    def from_iterable(self, frames: Iterator[ImageLike | StreamFrame]) -> Iterator[pb.EstimateRequest]:
        """The requests of the call being opened. A stream opened again after a break reads on from the
        same `frames`: the broken call takes no more of them, and two calls never take one at once."""
        return self._requests(frames, self._call)

    def _requests(self, frames: Iterator[ImageLike | StreamFrame], call: int) -> Iterator[pb.EstimateRequest]:
        while True:
            with self._taking:
                if call != self._call or self.exhausted:
                    return
                try:
                    item = self._carried.pop() if self._carried else next(frames)
                    if call != self._call:
                        self._carried.append(item)
                        return
                    request = self.request(item)
                except StopIteration:
                    self.exhausted = True
                    return
                except Exception as error:
                    self._error = error
                    self.exhausted = True
                    return
            yield request

    async def from_any(self, frames: Frames) -> AsyncIterator[pb.EstimateRequest]:
        try:
            if isinstance(frames, AsyncIterable):
                async for item in frames:
                    yield self.request(item)
            else:
                for item in frames:
                    yield self.request(item)
        except Exception as error:
            self._error = error

    @contextmanager
    def reading(self, call: Any) -> Iterator[None]:
        """Around reading the stream's responses, sync or asyncio: a failed RPC raises DepthdError, the
        error that ended the requests is raised after the last response, and leaving early (or failing)
        cancels the call."""
        try:
            with rpc_errors():
                yield
            if self._error is not None:
                raise self._error
        finally:
            call.cancel()


def to_image(image: ImageLike, pixel_format: PixelFormat | None = None) -> pb.Image:
    """A path, file bytes, a numpy uint8 array (RGB unless `pixel_format` says otherwise) or a PIL
    image -> the Image message."""
    if isinstance(image, (str, Path)):
        return pb.Image(encoded=Path(image).read_bytes())
    if isinstance(image, (bytes, bytearray, memoryview)):
        return pb.Image(encoded=bytes(image))
    if type(image).__module__.startswith("PIL."):
        if image.mode not in ("RGB", "RGBA", "L"):
            image = image.convert("RGB")
        pixel_format = _PIL_FORMATS[image.mode]
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


# --- responses -----------------------------------------------------------------------------------

_KIND_NAMES: dict[int, DepthKind] = {pb.DepthKind.Value(f"DEPTH_KIND_{name.upper()}"): name for name in get_args(DepthKind)}
_DTYPES = {pb.DEPTH_ENCODING_UNSPECIFIED: np.dtype("<f4")} | {
    _ENCODINGS[name]: np.dtype(dtype) for name, dtype in (("float32", "<f4"), ("float16", "<f2"), ("uint16_mm", "<u2"))
}
_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def to_result(response: pb.EstimateResponse) -> DepthResult:
    error = None
    if response.HasField("error"):
        code = _STATUS_BY_NUMBER.get(response.error.code, grpc.StatusCode.UNKNOWN)
        error = FrameError(code, response.error.message)
    depth = None
    kind: DepthKind | Literal[""] = ""
    lo = hi = 0.0
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
    points = points_rgb = intrinsics = alignment = None
    if response.HasField("points"):
        points, points_rgb = _points(response.points)
    if response.HasField("intrinsics"):
        c = response.intrinsics
        intrinsics = CameraIntrinsics(c.fx, c.fy, c.cx, c.cy)
    if response.HasField("alignment"):
        a = response.alignment
        alignment = Alignment(a.scale, a.shift, a.hints_used, a.hints_rejected, a.rmse_m)
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
        points=points,
        points_rgb=points_rgb,
        intrinsics=intrinsics,
        alignment=alignment,
    )


def _points(cloud: pb.PointCloud) -> tuple[np.ndarray, np.ndarray | None]:
    """An organized cloud -> HxWx3 float32 points (native byte order, writable) and HxWx3 uint8 colours
    (None without them)."""
    shape = (cloud.height, cloud.width, 3)
    points = np.frombuffer(cloud.xyz, dtype="<f4").reshape(shape).astype(np.float32, copy=True)
    rgb = np.frombuffer(cloud.rgb, dtype=np.uint8).reshape(shape).copy() if cloud.rgb else None
    return points, rgb


def to_models(response: pb.ListModelsResponse) -> list[ModelInfo]:
    return [
        ModelInfo(
            name=m.name, source=m.source, architecture=m.architecture, kind=_KIND_NAMES.get(m.kind, ""),
            device=m.device, dtype=m.dtype, is_default=m.is_default, ready=m.ready, demo=m.demo,
            note=m.note, frames_total=m.frames_total, frames_dropped=m.frames_dropped,
            batch_sizes=dict(sorted(m.batch_sizes.items())), max_batch=m.max_batch, queue_peak=m.queue_peak,
            max_processed_side=m.max_processed_side, max_queue_bytes=m.max_queue_bytes,
            bytes_held=m.bytes_held, bytes_peak=m.bytes_peak, queue_depth=m.queue_depth,
            input_size=m.input_size, backend=m.backend,
        )
        for m in response.models
    ]


# --- health --------------------------------------------------------------------------------------

_HEALTH_NAMES: dict[int, HealthStatus] = {
    health_pb2.HealthCheckResponse.ServingStatus.Value(name): name for name in get_args(HealthStatus)
}
_WAIT_RETRIES_ON = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def health_request(service: str) -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=service)


def health_status(response: health_pb2.HealthCheckResponse) -> HealthStatus:
    return _HEALTH_NAMES.get(response.status, "UNKNOWN")


def health_failure(error: grpc.RpcError) -> HealthStatus:
    """A failed Check: NOT_FOUND (a service the daemon does not know) is "SERVICE_UNKNOWN"; anything
    else raises DepthdError."""
    if error.code() is grpc.StatusCode.NOT_FOUND:
        return "SERVICE_UNKNOWN"
    raise DepthdError.from_rpc(error) from None


class ServingWait:
    """`wait_until_serving`'s deadline and rule: watch the health service until it says SERVING; while
    the daemon cannot be reached (or a watch runs out of time), try again until the deadline."""

    def __init__(self, target: str, timeout: float, service: str):
        self.request = health_request(service)
        self._target = target
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout

    def left(self) -> float:
        """Seconds left for the next watch; DepthdError (DEADLINE_EXCEEDED) when there are none."""
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise DepthdError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"{self._target} not SERVING after {self._timeout:g} s"
            )
        return left

    @staticmethod
    def serving(response: health_pb2.HealthCheckResponse) -> bool:
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    def pause_after(self, error: grpc.RpcError) -> float:
        """Seconds to wait before the next watch after `error`; DepthdError if it is not worth one."""
        if error.code() not in _WAIT_RETRIES_ON:
            raise DepthdError.from_rpc(error) from None
        return min(0.2, max(0.0, self._deadline - time.monotonic()))
