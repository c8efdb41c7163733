"""Conversion between the depthd.v1 protobuf messages and the daemon's domain types, in one place.

Request validation that needs only the message (a missing image, an unspecified raw
format, an output size beyond the limit) happens here, with errors that name the field.
"""

from __future__ import annotations

import math

from depthd.config import Limits
from depthd.domain import (
    Alignment,
    DepthEncoding,
    DepthKind,
    DepthResult,
    Geometry,
    Hint,
    Intrinsics,
    OutputSpec,
    PixelFormat,
)
from depthd.errors import InvalidArgument
from depthd.serving.batcher import PoolResult
from depthd.serving.frames import EncodedImage, ImageSource, RawImage
from depthd.serving.pool import ModelStatus
from depthd_client.v1 import depth_pb2 as pb

# The proto's enum values are the domain's, named with the enum's prefix (PIXEL_FORMAT_RGB8 is
# PixelFormat.RGB8): a value added to both needs no change here.
_PIXEL_FORMATS = {pb.PixelFormat.Value(f"PIXEL_FORMAT_{f.name}"): f for f in PixelFormat}
_ENCODINGS = {pb.DepthEncoding.Value(f"DEPTH_ENCODING_{e.name}"): e for e in DepthEncoding}
_ENCODINGS[pb.DEPTH_ENCODING_UNSPECIFIED] = DepthEncoding.FLOAT32
_ENCODING_TO_PB = {e: pb.DepthEncoding.Value(f"DEPTH_ENCODING_{e.name}") for e in DepthEncoding}
_KINDS = {k: pb.DepthKind.Value(f"DEPTH_KIND_{k.name}") for k in DepthKind}
MAX_HINTS = 10_000
"""Hints one request may carry: a dense LiDAR scan, subsampled; more would cost the fit for nothing."""


def image_source(request: pb.EstimateRequest) -> ImageSource:
    which = request.image.WhichOneof("source") if request.HasField("image") else None
    if which == "encoded":
        return EncodedImage(request.image.encoded)
    if which == "raw":
        raw = request.image.raw
        return RawImage(raw.width, raw.height, _PIXEL_FORMATS.get(raw.format), raw.data)
    raise InvalidArgument("image: required, as image.encoded (JPEG/PNG/WebP/BMP/TIFF bytes) or image.raw")


def output_spec(request: pb.EstimateRequest, limits: Limits) -> OutputSpec:
    output = request.output
    if output.encoding not in _ENCODINGS:
        raise InvalidArgument(f"output.encoding: unknown value {output.encoding}")
    for name in ("width", "height"):
        value = getattr(output, name)
        if value > limits.max_output_side:
            raise InvalidArgument(f"output.{name}: {value} is over the limit of {limits.max_output_side}")
    if not (math.isfinite(output.vis_min) and math.isfinite(output.vis_max)):
        raise InvalidArgument("output.vis_min/vis_max: must be finite numbers (0 and 0: each frame's own range)")
    fixed = output.vis_min != 0 or output.vis_max != 0
    if fixed and output.vis_max <= output.vis_min:
        raise InvalidArgument(f"output.vis_max: {output.vis_max:g} must be over vis_min ({output.vis_min:g})")
    return OutputSpec(
        encoding=_ENCODINGS[output.encoding],
        width=output.width,
        height=output.height,
        visualization=output.visualization,
        colormap=output.colormap or None,
        point_cloud=output.point_cloud,
        point_stride=max(1, output.point_stride),
        point_cloud_rgb=output.point_cloud_rgb,
        vis_range=(output.vis_min, output.vis_max) if fixed else None,
    )


def geometry(request: pb.EstimateRequest) -> Geometry:
    """The request's camera, hints and stabilize flag; hints are checked one by one later (a bad
    one is rejected and counted, never an error), the intrinsics here."""
    if len(request.hints) > MAX_HINTS:
        raise InvalidArgument(f"hints: {len(request.hints)} of them, over the limit of {MAX_HINTS}")
    intrinsics = None
    if request.HasField("intrinsics"):
        k = request.intrinsics
        intrinsics = Intrinsics(k.fx, k.fy, k.cx, k.cy).check("intrinsics")
    hints = tuple(Hint(h.x, h.y, h.depth_m) for h in request.hints)
    return Geometry(intrinsics, hints, request.stabilize)


def response(request: pb.EstimateRequest, done: PoolResult) -> pb.EstimateResponse:
    if done.dropped:
        return pb.EstimateResponse(
            frame_id=request.frame_id,
            timestamp_ns=request.timestamp_ns,
            model=done.model,
            dropped=True,
            timing=pb.Timing(queue_ms=done.queue_ms, total_ms=done.total_ms),
        )
    result = done.result
    height, width = result.depth.shape[:2]
    timing = result.timing
    return pb.EstimateResponse(
        frame_id=request.frame_id,
        timestamp_ns=request.timestamp_ns,
        model=done.model,
        depth=pb.DepthMap(
            width=width,
            height=height,
            encoding=_ENCODING_TO_PB[result.encoding],
            data=result.depth.astype(result.depth.dtype.newbyteorder("<"), copy=False).tobytes(),
            kind=_KINDS[result.kind],
            min=result.min,
            max=result.max,
        ),
        visualization_png=done.visualization_png or b"",
        timing=pb.Timing(
            queue_ms=done.queue_ms,
            preprocess_ms=timing.preprocess_ms,
            inference_ms=timing.inference_ms,
            postprocess_ms=timing.postprocess_ms,
            total_ms=done.total_ms,
            batch_size=timing.batch_size,
        ),
        field_of_view_deg=result.field_of_view or 0.0,
        focal_length_px=result.focal_length or 0.0,
        intrinsics=_intrinsics(result.intrinsics),
        points=_points(result),
        alignment=_alignment(result.alignment),
    )


def _intrinsics(k: Intrinsics | None) -> pb.CameraIntrinsics | None:
    return None if k is None else pb.CameraIntrinsics(fx=k.fx, fy=k.fy, cx=k.cx, cy=k.cy)


def _points(result: DepthResult) -> pb.PointCloud | None:
    if result.points is None:
        return None
    rows, columns = result.points.shape[:2]
    rgb = b"" if result.points_rgb is None else result.points_rgb.tobytes()
    return pb.PointCloud(width=columns, height=rows, xyz=result.points.astype("<f4", copy=False).tobytes(), rgb=rgb)


def _alignment(a: Alignment | None) -> pb.Alignment | None:
    if a is None:
        return None
    return pb.Alignment(scale=a.scale, shift=a.shift, hints_used=a.hints_used, hints_rejected=a.hints_rejected,
                        rmse_m=a.rmse_m)


def ids_only(request: pb.EstimateRequest) -> pb.EstimateRequest:
    """What a response needs of its request, without the image a waiting stream would otherwise hold."""
    return pb.EstimateRequest(model=request.model, frame_id=request.frame_id, timestamp_ns=request.timestamp_ns)


def error_response(request: pb.EstimateRequest, model: str, code: int, message: str) -> pb.EstimateResponse:
    """The response for a stream's frame that failed: ids and the model's name, no depth, the status in `error`."""
    return pb.EstimateResponse(
        frame_id=request.frame_id,
        timestamp_ns=request.timestamp_ns,
        model=model,
        error=pb.Error(code=code, message=message),
    )


def model_info(status: ModelStatus) -> pb.ModelInfo:
    note = "DEMO: random weights, its depth values mean nothing" if status.demo else ""
    return pb.ModelInfo(
        name=status.name,
        source=status.source,
        architecture=status.architecture,
        kind=_KINDS.get(status.kind, pb.DEPTH_KIND_UNSPECIFIED),
        device=status.device,
        dtype=status.dtype,
        backend=status.backend,
        input_size=status.input_size,
        is_default=status.is_default,
        ready=status.ready,
        demo=status.demo,
        note=note,
        frames_total=status.frames_total,
        frames_dropped=status.frames_dropped,
        batch_sizes=status.batch_sizes,
        max_batch=status.max_batch,
        queue_peak=status.queue_peak,
        max_processed_side=status.max_processed_side,
        max_queue_bytes=status.max_queue_bytes,
        bytes_held=status.bytes_held,
        bytes_peak=status.bytes_peak,
        queue_depth=status.queue_depth,
    )
