from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PixelFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PIXEL_FORMAT_UNSPECIFIED: _ClassVar[PixelFormat]
    PIXEL_FORMAT_RGB8: _ClassVar[PixelFormat]
    PIXEL_FORMAT_BGR8: _ClassVar[PixelFormat]
    PIXEL_FORMAT_RGBA8: _ClassVar[PixelFormat]
    PIXEL_FORMAT_BGRA8: _ClassVar[PixelFormat]
    PIXEL_FORMAT_GRAY8: _ClassVar[PixelFormat]

class DepthEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEPTH_ENCODING_UNSPECIFIED: _ClassVar[DepthEncoding]
    DEPTH_ENCODING_FLOAT32: _ClassVar[DepthEncoding]
    DEPTH_ENCODING_FLOAT16: _ClassVar[DepthEncoding]
    DEPTH_ENCODING_UINT16_MM: _ClassVar[DepthEncoding]

class DepthKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEPTH_KIND_UNSPECIFIED: _ClassVar[DepthKind]
    DEPTH_KIND_METRIC: _ClassVar[DepthKind]
    DEPTH_KIND_RELATIVE_DISPARITY: _ClassVar[DepthKind]
    DEPTH_KIND_RELATIVE_DEPTH: _ClassVar[DepthKind]
PIXEL_FORMAT_UNSPECIFIED: PixelFormat
PIXEL_FORMAT_RGB8: PixelFormat
PIXEL_FORMAT_BGR8: PixelFormat
PIXEL_FORMAT_RGBA8: PixelFormat
PIXEL_FORMAT_BGRA8: PixelFormat
PIXEL_FORMAT_GRAY8: PixelFormat
DEPTH_ENCODING_UNSPECIFIED: DepthEncoding
DEPTH_ENCODING_FLOAT32: DepthEncoding
DEPTH_ENCODING_FLOAT16: DepthEncoding
DEPTH_ENCODING_UINT16_MM: DepthEncoding
DEPTH_KIND_UNSPECIFIED: DepthKind
DEPTH_KIND_METRIC: DepthKind
DEPTH_KIND_RELATIVE_DISPARITY: DepthKind
DEPTH_KIND_RELATIVE_DEPTH: DepthKind

class RawImage(_message.Message):
    __slots__ = ("width", "height", "format", "data")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    format: PixelFormat
    data: bytes
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., format: _Optional[_Union[PixelFormat, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "raw")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class OutputOptions(_message.Message):
    __slots__ = ("encoding", "width", "height", "visualization", "colormap", "point_cloud", "point_stride", "point_cloud_rgb", "vis_min", "vis_max")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    VISUALIZATION_FIELD_NUMBER: _ClassVar[int]
    COLORMAP_FIELD_NUMBER: _ClassVar[int]
    POINT_CLOUD_FIELD_NUMBER: _ClassVar[int]
    POINT_STRIDE_FIELD_NUMBER: _ClassVar[int]
    POINT_CLOUD_RGB_FIELD_NUMBER: _ClassVar[int]
    VIS_MIN_FIELD_NUMBER: _ClassVar[int]
    VIS_MAX_FIELD_NUMBER: _ClassVar[int]
    encoding: DepthEncoding
    width: int
    height: int
    visualization: bool
    colormap: str
    point_cloud: bool
    point_stride: int
    point_cloud_rgb: bool
    vis_min: float
    vis_max: float
    def __init__(self, encoding: _Optional[_Union[DepthEncoding, str]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., visualization: bool = ..., colormap: _Optional[str] = ..., point_cloud: bool = ..., point_stride: _Optional[int] = ..., point_cloud_rgb: bool = ..., vis_min: _Optional[float] = ..., vis_max: _Optional[float] = ...) -> None: ...

class CameraIntrinsics(_message.Message):
    __slots__ = ("fx", "fy", "cx", "cy")
    FX_FIELD_NUMBER: _ClassVar[int]
    FY_FIELD_NUMBER: _ClassVar[int]
    CX_FIELD_NUMBER: _ClassVar[int]
    CY_FIELD_NUMBER: _ClassVar[int]
    fx: float
    fy: float
    cx: float
    cy: float
    def __init__(self, fx: _Optional[float] = ..., fy: _Optional[float] = ..., cx: _Optional[float] = ..., cy: _Optional[float] = ...) -> None: ...

class DepthHint(_message.Message):
    __slots__ = ("x", "y", "depth_m")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    DEPTH_M_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    depth_m: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ..., depth_m: _Optional[float] = ...) -> None: ...

class EstimateRequest(_message.Message):
    __slots__ = ("model", "image", "frame_id", "timestamp_ns", "output", "latest_frame_wins", "intrinsics", "hints", "stabilize")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_NS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    LATEST_FRAME_WINS_FIELD_NUMBER: _ClassVar[int]
    INTRINSICS_FIELD_NUMBER: _ClassVar[int]
    HINTS_FIELD_NUMBER: _ClassVar[int]
    STABILIZE_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: Image
    frame_id: int
    timestamp_ns: int
    output: OutputOptions
    latest_frame_wins: bool
    intrinsics: CameraIntrinsics
    hints: _containers.RepeatedCompositeFieldContainer[DepthHint]
    stabilize: bool
    def __init__(self, model: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., frame_id: _Optional[int] = ..., timestamp_ns: _Optional[int] = ..., output: _Optional[_Union[OutputOptions, _Mapping]] = ..., latest_frame_wins: bool = ..., intrinsics: _Optional[_Union[CameraIntrinsics, _Mapping]] = ..., hints: _Optional[_Iterable[_Union[DepthHint, _Mapping]]] = ..., stabilize: bool = ...) -> None: ...

class DepthMap(_message.Message):
    __slots__ = ("width", "height", "encoding", "data", "kind", "min", "max")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    encoding: DepthEncoding
    data: bytes
    kind: DepthKind
    min: float
    max: float
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., encoding: _Optional[_Union[DepthEncoding, str]] = ..., data: _Optional[bytes] = ..., kind: _Optional[_Union[DepthKind, str]] = ..., min: _Optional[float] = ..., max: _Optional[float] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "preprocess_ms", "inference_ms", "postprocess_ms", "total_ms", "batch_size")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    POSTPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    preprocess_ms: float
    inference_ms: float
    postprocess_ms: float
    total_ms: float
    batch_size: int
    def __init__(self, queue_ms: _Optional[float] = ..., preprocess_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., postprocess_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class PointCloud(_message.Message):
    __slots__ = ("width", "height", "xyz", "rgb")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    XYZ_FIELD_NUMBER: _ClassVar[int]
    RGB_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    xyz: bytes
    rgb: bytes
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., xyz: _Optional[bytes] = ..., rgb: _Optional[bytes] = ...) -> None: ...

class Alignment(_message.Message):
    __slots__ = ("scale", "shift", "hints_used", "hints_rejected", "rmse_m")
    SCALE_FIELD_NUMBER: _ClassVar[int]
    SHIFT_FIELD_NUMBER: _ClassVar[int]
    HINTS_USED_FIELD_NUMBER: _ClassVar[int]
    HINTS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    RMSE_M_FIELD_NUMBER: _ClassVar[int]
    scale: float
    shift: float
    hints_used: int
    hints_rejected: int
    rmse_m: float
    def __init__(self, scale: _Optional[float] = ..., shift: _Optional[float] = ..., hints_used: _Optional[int] = ..., hints_rejected: _Optional[int] = ..., rmse_m: _Optional[float] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class EstimateResponse(_message.Message):
    __slots__ = ("frame_id", "timestamp_ns", "model", "depth", "visualization_png", "timing", "error", "dropped", "field_of_view_deg", "focal_length_px", "stream_dropped", "intrinsics", "points", "alignment")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_NS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    VISUALIZATION_PNG_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    FIELD_OF_VIEW_DEG_FIELD_NUMBER: _ClassVar[int]
    FOCAL_LENGTH_PX_FIELD_NUMBER: _ClassVar[int]
    STREAM_DROPPED_FIELD_NUMBER: _ClassVar[int]
    INTRINSICS_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    timestamp_ns: int
    model: str
    depth: DepthMap
    visualization_png: bytes
    timing: Timing
    error: Error
    dropped: bool
    field_of_view_deg: float
    focal_length_px: float
    stream_dropped: int
    intrinsics: CameraIntrinsics
    points: PointCloud
    alignment: Alignment
    def __init__(self, frame_id: _Optional[int] = ..., timestamp_ns: _Optional[int] = ..., model: _Optional[str] = ..., depth: _Optional[_Union[DepthMap, _Mapping]] = ..., visualization_png: _Optional[bytes] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., dropped: bool = ..., field_of_view_deg: _Optional[float] = ..., focal_length_px: _Optional[float] = ..., stream_dropped: _Optional[int] = ..., intrinsics: _Optional[_Union[CameraIntrinsics, _Mapping]] = ..., points: _Optional[_Union[PointCloud, _Mapping]] = ..., alignment: _Optional[_Union[Alignment, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "source", "architecture", "kind", "device", "dtype", "is_default", "ready", "demo", "note", "frames_total", "frames_dropped", "batch_sizes", "max_batch", "queue_peak", "max_processed_side", "max_queue_bytes", "bytes_held", "bytes_peak", "queue_depth", "input_size", "backend")
    class BatchSizesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    DEMO_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    QUEUE_PEAK_FIELD_NUMBER: _ClassVar[int]
    MAX_PROCESSED_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_HELD_FIELD_NUMBER: _ClassVar[int]
    BYTES_PEAK_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: str
    architecture: str
    kind: DepthKind
    device: str
    dtype: str
    is_default: bool
    ready: bool
    demo: bool
    note: str
    frames_total: int
    frames_dropped: int
    batch_sizes: _containers.ScalarMap[int, int]
    max_batch: int
    queue_peak: int
    max_processed_side: int
    max_queue_bytes: int
    bytes_held: int
    bytes_peak: int
    queue_depth: int
    input_size: int
    backend: str
    def __init__(self, name: _Optional[str] = ..., source: _Optional[str] = ..., architecture: _Optional[str] = ..., kind: _Optional[_Union[DepthKind, str]] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., is_default: bool = ..., ready: bool = ..., demo: bool = ..., note: _Optional[str] = ..., frames_total: _Optional[int] = ..., frames_dropped: _Optional[int] = ..., batch_sizes: _Optional[_Mapping[int, int]] = ..., max_batch: _Optional[int] = ..., queue_peak: _Optional[int] = ..., max_processed_side: _Optional[int] = ..., max_queue_bytes: _Optional[int] = ..., bytes_held: _Optional[int] = ..., bytes_peak: _Optional[int] = ..., queue_depth: _Optional[int] = ..., input_size: _Optional[int] = ..., backend: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "max_message_bytes")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    max_message_bytes: int
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...
