"""The types every box shares: a frame in, a depth map out, and what its numbers mean."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np

from depthd.errors import InvalidArgument

MIN_SIDE = 16
"""The smallest frame side the engine takes: ZoeDepth's reflection padding needs a few pixels."""


class DepthKind(str, enum.Enum):
    """What a depth map's numbers mean, decided from the model's config."""

    METRIC = "metric"
    """Depth in metres along the optical axis."""
    RELATIVE_DISPARITY = "relative_disparity"
    """Inverse depth up to an unknown scale and shift: larger is nearer."""
    RELATIVE_DEPTH = "relative_depth"
    """Depth up to an unknown scale: larger is farther."""

    @property
    def larger_is_nearer(self) -> bool:
        return self is DepthKind.RELATIVE_DISPARITY


class DepthEncoding(str, enum.Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    UINT16_MM = "uint16_mm"
    """Millimetres as unsigned 16-bit integers, 0 for no value; metric models only."""

    @property
    def bytes_per_value(self) -> int:
        return 4 if self is DepthEncoding.FLOAT32 else 2


class PixelFormat(str, enum.Enum):
    RGB8 = "rgb8"
    BGR8 = "bgr8"
    RGBA8 = "rgba8"
    BGRA8 = "bgra8"
    GRAY8 = "gray8"

    @property
    def channels(self) -> int:
        return {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "gray8": 1}[self.value]


@dataclass(frozen=True)
class Frame:
    """One camera frame: uint8 pixels, HxW or HxWxC, in the layout `pixel_format` names.

    The engine turns any format into RGB on the model's device, so a BGR or RGBA
    buffer from a camera driver is used as it is, without a copy on the host.
    """

    pixels: np.ndarray
    pixel_format: PixelFormat = PixelFormat.RGB8

    def __post_init__(self) -> None:
        pixels = self.pixels
        if pixels.dtype != np.uint8:
            raise InvalidArgument(f"image: pixels must be uint8, got {pixels.dtype}")
        channels = 1 if pixels.ndim == 2 else pixels.shape[-1] if pixels.ndim == 3 else None
        if channels != self.pixel_format.channels:
            raise InvalidArgument(
                f"image: a {self.pixel_format.name} frame has {self.pixel_format.channels} channel(s), "
                f"got an array of shape {pixels.shape}"
            )
        if min(pixels.shape[:2]) < MIN_SIDE:
            raise InvalidArgument(
                f"image: {pixels.shape[1]}x{pixels.shape[0]} is too small; each side must be at least {MIN_SIDE} pixels"
            )

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


PNG_FRAMING = 1024
"""PNG signature, chunk headers and zlib's own framing, generously."""
REPLY_FRAMING = 1024
"""The reply's other fields: ids, timing, the map's header."""


@dataclass(frozen=True)
class OutputSpec:
    """What the caller wants back for one frame.

    `width`/`height` of 0 mean the input's size; when only one is given, the other
    follows the input's aspect ratio.
    """

    encoding: DepthEncoding = DepthEncoding.FLOAT32
    width: int = 0
    height: int = 0
    visualization: bool = False
    colormap: str | None = None
    point_cloud: bool = False
    point_stride: int = 1
    """Every n-th row and column of the map become points."""
    point_cloud_rgb: bool = False
    vis_range: tuple[float, float] | None = None
    """The visualization's fixed (min, max), in the map's unit; None: each frame's own."""

    def size_for(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) of the depth map for an input of the given size."""
        if self.width and self.height:
            return self.height, self.width
        if self.width:
            return max(1, round(height * self.width / width)), self.width
        if self.height:
            return self.height, max(1, round(width * self.height / height))
        return height, width

    def reply_bytes(self, height: int, width: int) -> int:
        """An upper bound on the reply for a map of this size: the map, and the visualization PNG
        at its largest (stored, not compressed: PNG adds a filter byte a row and a little framing)."""
        size = height * width * self.encoding.bytes_per_value
        if self.visualization:
            channels = 1 if (self.colormap or "gray") == "gray" else 3
            raw = height * (width * channels + 1)
            size += raw + raw // 16_000 * 5 + PNG_FRAMING
        return size + self.points_bytes(height, width) + REPLY_FRAMING

    def points_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of the point cloud of a map of this size: every point_stride-th of each."""
        stride = max(1, self.point_stride)
        return -(-height // stride), -(-width // stride)

    def points_bytes(self, height: int, width: int) -> int:
        if not self.point_cloud:
            return 0
        rows, columns = self.points_grid(height, width)
        return rows * columns * (12 + (3 if self.point_cloud_rgb else 0))


@dataclass(frozen=True)
class Intrinsics:
    """A pinhole camera, in pixels of one image; pixel centres at whole coordinates (OpenCV, ROS)."""

    fx: float
    fy: float
    cx: float
    cy: float

    def check(self, field: str = "intrinsics") -> "Intrinsics":
        for name in ("fx", "fy"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise InvalidArgument(f"{field}.{name}: must be a positive number of pixels, got {value!r}")
        for name in ("cx", "cy"):
            if not math.isfinite(getattr(self, name)):
                raise InvalidArgument(f"{field}.{name}: must be a finite number of pixels, got {getattr(self, name)!r}")
        return self

    def scaled(self, source: tuple[int, int], target: tuple[int, int]) -> "Intrinsics":
        """These intrinsics for the image resized from `source` to `target` (height, width)."""
        sy, sx = target[0] / source[0], target[1] / source[1]
        return Intrinsics(self.fx * sx, self.fy * sy, (self.cx + 0.5) * sx - 0.5, (self.cy + 0.5) * sy - 0.5)


@dataclass(frozen=True)
class Hint:
    """A true depth at one pixel of the input image (x a column, y a row), metres."""

    x: float
    y: float
    depth_m: float


@dataclass(frozen=True)
class Geometry:
    """What a request tells of its camera and scene: its intrinsics (None: the model's, if any),
    true depths at a few pixels, and whether its stream wants stable maps."""

    intrinsics: Intrinsics | None = None
    hints: tuple[Hint, ...] = ()
    stabilize: bool = False


@dataclass(frozen=True)
class Alignment:
    """How a map was fitted to its hints; `hints_used` under 3: not fitted, the map is the model's."""

    scale: float
    shift: float
    hints_used: int
    hints_rejected: int
    rmse_m: float

    @property
    def applied(self) -> bool:
        return self.hints_used >= MIN_HINTS


MIN_HINTS = 3
"""Usable hints needed to fit a map to them."""


@dataclass(frozen=True)
class StageTimes:
    """Milliseconds the batch a frame rode in spent in each engine stage."""

    preprocess_ms: float = 0.0
    inference_ms: float = 0.0
    postprocess_ms: float = 0.0
    batch_size: int = 1


@dataclass
class DepthResult:
    """One frame's depth map, encoded as asked, and what it means.

    `min`/`max` are those of the float map in its own unit (metres when metric),
    whatever the encoding. `focal_length` is in pixels of the returned map.
    """

    depth: np.ndarray
    encoding: DepthEncoding
    kind: DepthKind
    min: float
    max: float
    visualization: np.ndarray | None = None
    field_of_view: float | None = None
    focal_length: float | None = None
    timing: StageTimes = field(default_factory=StageTimes)
    intrinsics: Intrinsics | None = None
    """The intrinsics used, scaled to the returned map."""
    points: np.ndarray | None = None
    """(rows, columns, 3) float32 x, y, z in metres, optical frame; NaN where the depth is not valid."""
    points_rgb: np.ndarray | None = None
    """(rows, columns, 3) uint8, the input frame's colour at each point."""
    alignment: Alignment | None = None
