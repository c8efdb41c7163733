"""`depthctl bag`: depth maps (and point clouds) for the images of a ROS bag, written with the bag's
own topics into a new MCAP file, through one stream to the daemon and in bounded memory.

Two readers walk the same bag side by side. The stream's feed (run by gRPC on its own thread) reads
the image topic, the CameraInfo topic and the hints topic and turns each image into a `StreamFrame`.
The writer (this thread) reads every topic in log-time order, copies each message, and for each
image takes the next result of the stream: results come back in order, so the writer never reads
ahead of the image it is waiting for, and what is in flight is a few frames and their header
stamps. ROS 1 bags are written as ROS 2 (CDR) messages, as `rosbags-convert` would.

Needs `rosbags` (the `depthd-client[bags]` extra), imported only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from depthd_client import progress
from depthd_client.client import DepthClient
from depthd_client.messages import DepthResult, StreamFrame

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
CAMERA_INFO = "sensor_msgs/msg/CameraInfo"
POINT_CLOUD2 = "sensor_msgs/msg/PointCloud2"
STRING = "std_msgs/msg/String"
WRITTEN_TYPES = (IMAGE, POINT_CLOUD2, "sensor_msgs/msg/PointField", STRING, "std_msgs/msg/Header",
                 "builtin_interfaces/msg/Time")

PIXEL_FORMATS = {"rgb8": ("rgb8", 3), "bgr8": ("bgr8", 3), "rgba8": ("rgba8", 4), "bgra8": ("bgra8", 4),
                 "mono8": ("gray8", 1)}
"""sensor_msgs/Image encodings sent as raw frames: ROS encoding -> (the client's pixel format, channels)."""
ENCODED_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}

KIND_TEXT = {
    "metric": "metric: metres along the optical axis",
    "relative_disparity": "relative_disparity: NOT metres; inverse depth up to an unknown scale and shift, "
                          "larger is nearer",
    "relative_depth": "relative_depth: NOT metres; depth up to an unknown scale, larger is farther",
}
"""The text of each message on the kind topic: the kind's name, a colon, what the values mean."""

IN_FLIGHT = 32
"""Frames the feed may run ahead of the writer: the stamps kept for them are all that is held."""
MAX_HINTS = 1000
"""A hints cloud is thinned to this many projected points (evenly) before it is sent."""
ERRORS_SHOWN = 10
FLOAT32 = 7  # sensor_msgs/PointField datatype
FLOAT64 = 8

DESCRIPTION = """\
Depth for the images of a ROS 1 or ROS 2 bag (.bag, .mcap, .db3 or a rosbag2 folder), written to a new
MCAP bag (ROS 2 messages) with all the input's topics copied, through one stream to the daemon.

For each image on --image-topic (sensor_msgs/Image in rgb8, bgr8, rgba8, bgra8 or mono8, or
sensor_msgs/CompressedImage holding JPEG or PNG), every --stride-th one, it writes, with the image's
header (stamp, frame_id) and at the image's log time:
  <camera>/depth/image_raw (--depth-topic)
      sensor_msgs/Image, 32FC1: metres for a metric model, else the model's relative values
  <camera>/depth/kind (the depth topic's folder, then /kind)
      std_msgs/String saying what those values are: "metric: ...", "relative_disparity: NOT metres; ..."
      or "relative_depth: NOT metres; ..." (the kind is the text before the colon)
  <camera>/depth/points (--points-topic)
      sensor_msgs/PointCloud2, organized (the image's rows and columns), fields x, y, z float32 (and rgb
      with --rgb), metres in the camera's optical frame, NaN where there is no depth; only with a camera
      (CameraInfo or --intrinsics) and metric depth (a metric model, or a relative one made metric by
      --hints-topic)

Topic names: the camera's namespace is the image topic without a trailing /compressed, without its
last name (image_raw, image_rect, ...), and without a last `color` or `rgb` folder; the outputs go beside
it, as ROS names them: /cam/color/image_raw, /cam/image_raw and /cam/image_raw/compressed all give
/cam/depth/image_raw, /cam/depth/kind and /cam/depth/points. The camera comes from the image's sibling
camera_info topic (/cam/color/camera_info) when the bag has one.
"""


class BagError(Exception):
    """A bag, a topic or an option that cannot be used: said to the user, exit code 2."""


# --- the command line ----------------------------------------------------------------------------


def add_parser(commands) -> None:
    sub = commands.add_parser(
        "bag", help="depth (and point clouds) for the images of a ROS bag, into a new MCAP bag",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("input", metavar="INPUT", help="a ROS 1 .bag, a ROS 2 .mcap or .db3 file, or a rosbag2 folder")
    sub.add_argument("-o", "--output", metavar="OUTPUT.mcap", required=True, help="the MCAP file to write")
    sub.add_argument("--image-topic", metavar="TOPIC", required=True,
                     help="sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8) or sensor_msgs/CompressedImage")
    camera = sub.add_mutually_exclusive_group()
    camera.add_argument("--camera-info-topic", metavar="TOPIC",
                        help="sensor_msgs/CameraInfo: each image uses the latest one at or before it (the first one "
                             "for images before any); default: the image topic's sibling camera_info, if in the bag")
    camera.add_argument("--intrinsics", type=_intrinsics, metavar="fx,fy,cx,cy",
                        help="the camera, in pixels of the images, for every image (instead of a CameraInfo topic)")
    sub.add_argument("--depth-topic", metavar="TOPIC", help="default: <camera>/depth/image_raw")
    sub.add_argument("--points-topic", metavar="TOPIC", help="default: <camera>/depth/points")
    sub.add_argument("--model", default="", help="a model name from `depthctl models` (default: the daemon's)")
    sub.add_argument("--stride", type=_positive, default=1, metavar="N",
                     help="depth for every N-th image only (default 1: every image); all images are copied")
    sub.add_argument("--hints-topic", metavar="TOPIC",
                     help="sensor_msgs/PointCloud2 of true depths (a LiDAR's, a ToF's) in the camera's optical frame "
                          "(the images' frame_id; others are not used): each image gets the latest cloud at or before "
                          "it, projected with the camera, as hints; makes a relative model metric")
    sub.add_argument("--rgb", action="store_true", help="the points' colours too (a packed rgb field)")
    sub.add_argument("--no-copy", action="store_true", help="write only the depth topics, not the input's")
    sub.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")


def _intrinsics(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(cell) for cell in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"expected fx,fy,cx,cy (4 numbers), got {text!r}")
    return values


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def run(client: DepthClient, args: argparse.Namespace) -> int:
    try:
        from rosbags.highlevel import AnyReaderError
        from rosbags.rosbag1 import ReaderError as Reader1Error
        from rosbags.rosbag2 import ReaderError as Reader2Error
        from rosbags.rosbag2 import WriterError
        from rosbags.typesys import TypesysError
    except ImportError:
        print("depthctl bag: needs the rosbags package: pip install 'depthd-client[bags]'", file=sys.stderr)
        return 2
    try:
        return _Job(client, args).run()
    except (BagError, AnyReaderError, Reader1Error, Reader2Error, WriterError, TypesysError) as error:
        print(f"\ndepthctl bag: {error}" if sys.stderr.isatty() else f"depthctl bag: {error}", file=sys.stderr)
        return 2


# --- topic names ---------------------------------------------------------------------------------


def _image_folder(image_topic: str) -> list[str]:
    """The image topic's names without /compressed and without the image's own name."""
    names = [name for name in image_topic.split("/") if name]
    if names and names[-1] == "compressed":
        names.pop()
    return names[:-1]


def camera_namespace(image_topic: str) -> str:
    """/cam/color/image_raw, /cam/image_raw, /cam/image_raw/compressed -> /cam ("" at the root)."""
    names = _image_folder(image_topic)
    if names and names[-1] in ("color", "rgb"):
        names.pop()
    return "".join(f"/{name}" for name in names)


def default_topics(image_topic: str) -> tuple[str, str]:
    """(depth, points) topics beside the image topic's camera namespace."""
    namespace = camera_namespace(image_topic)
    return f"{namespace}/depth/image_raw", f"{namespace}/depth/points"


def sibling_camera_info(image_topic: str) -> str:
    """/cam/color/image_raw -> /cam/color/camera_info."""
    return "".join(f"/{name}" for name in _image_folder(image_topic)) + "/camera_info"


def kind_topic(depth_topic: str) -> str:
    """/cam/depth/image_raw -> /cam/depth/kind."""
    folder = depth_topic.rstrip("/").rsplit("/", 1)[0]
    return f"{folder}/kind"


# --- images, cameras and hints out of messages ---------------------------------------------------


@dataclass(frozen=True)
class Camera:
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    """The size the camera was calibrated at (0 if unknown): another image size scales it."""

    def for_size(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(fx, fy, cx, cy) for an image of this size; pixel centres stay at whole coordinates."""
        sx = width / self.width if self.width and width else 1.0
        sy = height / self.height if self.height and height else 1.0
        return self.fx * sx, self.fy * sy, (self.cx + 0.5) * sx - 0.5, (self.cy + 0.5) * sy - 0.5


def camera_of(info: Any) -> Camera | None:
    """A CameraInfo's K (ROS 2 `k`, ROS 1 `K`), None when it is not calibrated (fx or fy 0)."""
    k = getattr(info, "k", None)
    if k is None:
        k = info.K
    fx, fy, cx, cy = float(k[0]), float(k[4]), float(k[2]), float(k[5])
    if not (fx > 0 and fy > 0):
        return None
    return Camera(fx, fy, cx, cy, int(info.width), int(info.height))


def image_problem(msg: Any, msgtype: str) -> str | None:
    """Why this image message cannot be sent (None if it can)."""
    if msgtype == IMAGE:
        if msg.encoding not in PIXEL_FORMATS:
            return (f"image encoding {msg.encoding!r} is not supported: give one of {', '.join(PIXEL_FORMATS)} "
                    "(sensor_msgs/Image) or JPEG/PNG (sensor_msgs/CompressedImage)")
        channels = PIXEL_FORMATS[msg.encoding][1]
        if msg.width < 1 or msg.height < 1 or msg.step < msg.width * channels or len(msg.data) < msg.step * msg.height:
            return (f"a {msg.width}x{msg.height} {msg.encoding} image with step {msg.step} holds {len(msg.data)} bytes: "
                    "not a whole image")
        return None
    head = bytes(msg.data[:8])
    if not any(head.startswith(magic) for magic in ENCODED_MAGIC):
        return f"compressed image format {msg.format!r} is not supported: give JPEG or PNG"
    return None


def frame_of(msg: Any, msgtype: str) -> tuple[Any, str | None, int, int]:
    """(what to send, its pixel format, width, height) of an image message that `image_problem` passed:
    the pixels (row padding dropped) of an Image, the file bytes of a CompressedImage (size 0x0: unknown)."""
    if msgtype == COMPRESSED_IMAGE:
        return np.asarray(msg.data, dtype=np.uint8).tobytes(), None, 0, 0
    pixel_format, channels = PIXEL_FORMATS[msg.encoding]
    width, height = msg.width, msg.height
    rows = np.asarray(msg.data, dtype=np.uint8)[: msg.step * height].reshape(height, msg.step)
    pixels = rows[:, : width * channels].reshape((height, width, channels) if channels > 1 else (height, width))
    return pixels, pixel_format, width, height


def cloud_points(cloud: Any) -> np.ndarray:
    """Nx3 float64 x, y, z of a PointCloud2 (float32 or float64 fields; padding and endianness as it says)."""
    fields = {field.name: field for field in cloud.fields}
    if not all(name in fields and fields[name].datatype in (FLOAT32, FLOAT64) for name in "xyz"):
        raise BagError("the hints cloud needs float32 or float64 fields x, y and z")
    order = ">" if cloud.is_bigendian else "<"
    dtype = np.dtype({
        "names": ["x", "y", "z"],
        "formats": [order + ("f4" if fields[name].datatype == FLOAT32 else "f8") for name in "xyz"],
        "offsets": [fields[name].offset for name in "xyz"],
        "itemsize": cloud.point_step,
    })
    count = cloud.width * cloud.height
    if not count:
        return np.empty((0, 3))
    data = np.asarray(cloud.data, dtype=np.uint8)
    rows = data[: cloud.row_step * cloud.height].reshape(cloud.height, cloud.row_step)[:, : cloud.width * cloud.point_step]
    points = np.ascontiguousarray(rows).view(dtype).reshape(-1)
    return np.stack([points["x"], points["y"], points["z"]], axis=-1).astype(np.float64)


def project_hints(points: np.ndarray, intrinsics: tuple[float, float, float, float], width: int, height: int) -> np.ndarray:
    """Points in the camera's optical frame -> (x, y, depth_m) hints inside the image (when its size is
    known), in front of the camera, at most MAX_HINTS of them, evenly picked."""
    fx, fy, cx, cy = intrinsics
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u, v = fx * x / z + cx, fy * y / z + cy
    keep = np.isfinite(u) & np.isfinite(v) & np.isfinite(z) & (z > 0)
    if width and height:
        keep &= (u >= -0.5) & (u < width - 0.5) & (v >= -0.5) & (v < height - 0.5)
    hints = np.stack([u[keep], v[keep], z[keep]], axis=-1)
    if len(hints) > MAX_HINTS:
        hints = hints[np.linspace(0, len(hints) - 1, MAX_HINTS).round().astype(int)]
    return hints


# --- types: what the output bag's messages are ---------------------------------------------------


def output_typestore(reader: Any, copied: list[Any]) -> tuple[Any, dict[str, str]]:
    """The typestore the output is written with, and the copied message types it cannot take (type ->
    why). ROS 2 input: the bag's own types, plus ROS 2's for what this command writes. ROS 1 input: ROS 2
    (Humble) types, plus the bag's for types ROS 2 lacks; a type whose ROS 1 wire format differs from
    ROS 2's is not copied."""
    from rosbags.typesys import Stores, TypesysError, get_types_from_msg, get_typestore

    ros2 = get_typestore(Stores.ROS2_HUMBLE)
    if reader.is2:
        store = get_typestore(Stores.EMPTY)
        store.register(dict(reader.typestore.fielddefs))
        missing = {name: ros2.fielddefs[name] for name in WRITTEN_TYPES if name not in store.fielddefs}
        if missing:
            store.register(missing)
        return store, {}
    refused: dict[str, str] = {}
    for msgtype in sorted({connection.msgtype for connection in copied}):
        if msgtype not in ros2.fielddefs:
            definition = reader.typestore.generate_msgdef(msgtype, ros_version=2)[0]
            types = get_types_from_msg(definition, msgtype)
            types.pop("std_msgs/msg/Header", None)  # ROS 2's, without seq: ros1_to_cdr drops it
            try:
                ros2.register(types)
            except TypesysError as error:
                refused[msgtype] = str(error)
                continue
        if not _same_wire(reader.typestore, ros2, msgtype):
            refused[msgtype] = f"its ROS 1 definition is not ROS 2's {msgtype}"
    return ros2, refused


def _same_wire(source: Any, target: Any, msgtype: str) -> bool:
    """Whether a ROS 1 message of `source`'s msgtype converts field for field into `target`'s (names aside)."""
    if msgtype == "std_msgs/msg/Header":
        return True
    ours, theirs = source.fielddefs[msgtype][1], target.fielddefs.get(msgtype, ((), ()))[1]
    return len(ours) == len(theirs) and all(
        _same_field(source, target, a, b) for (_, a), (_, b) in zip(ours, theirs))


def _same_field(source: Any, target: Any, a: Any, b: Any) -> bool:
    from rosbags.interfaces import Nodetype

    if a[0] != b[0]:
        return False
    if a[0] == Nodetype.NAME:
        return a[1] == b[1] and _same_wire(source, target, a[1])
    if a[0] in (Nodetype.ARRAY, Nodetype.SEQUENCE):
        return a[1][1] == b[1][1] and _same_field(source, target, a[1][0], b[1][0])
    return bool(a[1] == b[1])


def _latched() -> list[Any]:
    """The QoS a latched ROS 1 topic gets in ROS 2: reliable, transient local."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    forever = QosTime(2147483647, 4294967295)
    return [Qos(QosHistory.UNKNOWN, 0, QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL, forever, forever,
                QosLiveliness.AUTOMATIC, forever, avoid_ros_namespace_conventions=False)]


# --- the job -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """What the writer needs of a frame the feed sent: kept while it is in flight."""

    index: int
    log_time: int
    sec: int
    nanosec: int
    frame_id: str


@dataclass
class Counts:
    messages: int = 0
    copied: int = 0
    images: int = 0
    sent: int = 0
    depth: int = 0
    points: int = 0
    failed: int = 0


class _Job:
    def __init__(self, client: DepthClient, args: argparse.Namespace):
        self.client = client
        self.args = args
        self.counts = Counts()
        self.kinds: set[str] = set()
        self.model = ""
        self.errors_shown = 0
        self.progress_total = 0
        self.started = 0.0

    # -- planning: everything that can be refused is refused before the stream opens

    def run(self) -> int:
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import Stores, get_typestore

        args = self.args
        source, output = Path(args.input), Path(args.output)
        if not source.exists():
            raise BagError(f"{source}: no such file or folder")
        if output.is_dir():
            raise BagError(f"{output} is a folder: give the MCAP file to write")
        if output.exists() and not args.overwrite:
            raise BagError(f"{output} exists: give --overwrite to replace it")
        if output.resolve() == source.resolve() or source.resolve() in output.resolve().parents:
            raise BagError(f"{output} would overwrite the input bag")
        with ExitStack() as stack:
            # Two readers of one bag: the feed's (on gRPC's thread) and the writer's; each keeps its own
            # file position. No type definitions in a bag (old sqlite3 bags): ROS 2 Humble's.
            feed = stack.enter_context(AnyReader([source], default_typestore=get_typestore(Stores.ROS2_HUMBLE)))
            main = stack.enter_context(AnyReader([source], default_typestore=get_typestore(Stores.ROS2_HUMBLE)))
            self._plan(feed)
            output.parent.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent.resolve()))
            stack.callback(shutil.rmtree, folder, ignore_errors=True)
            written = self._write(feed, main, folder / "bag")
            os.replace(written, output)
        self._summary(output)
        return 1 if self.counts.failed else 0

    def _plan(self, reader: Any) -> None:
        args = self.args
        topics = reader.topics
        self.image_topic = args.image_topic
        image = topics.get(self.image_topic)
        if image is None:
            images = sorted(name for name, info in topics.items() if info.msgtype in (IMAGE, COMPRESSED_IMAGE))
            raise BagError(f"no topic {self.image_topic} in {args.input}; its image topics: {', '.join(images) or 'none'}")
        if image.msgtype not in (IMAGE, COMPRESSED_IMAGE):
            raise BagError(f"{self.image_topic} is {image.msgtype or 'of several types'}: give a {IMAGE} or "
                           f"{COMPRESSED_IMAGE} topic")
        self.image_type = image.msgtype
        self.progress_total = image.msgcount
        if not image.msgcount:
            raise BagError(f"{self.image_topic} has no messages")
        self._check_first_image(reader, image.connections)

        self.info_topic = args.camera_info_topic
        if self.info_topic is None and args.intrinsics is None and sibling_camera_info(self.image_topic) in topics:
            self.info_topic = sibling_camera_info(self.image_topic)
        self.camera: Camera | None = None
        if args.intrinsics is not None:
            self.camera = Camera(*args.intrinsics, 0, 0)
        elif self.info_topic is not None:
            self.camera = self._first_camera(reader, self._topic(topics, self.info_topic, CAMERA_INFO, "--camera-info-topic"))
        self.hints_topic = args.hints_topic
        if self.hints_topic is not None:
            for connection, _, raw in reader.messages(connections=self._topic(topics, self.hints_topic, POINT_CLOUD2,
                                                                              "--hints-topic")):
                cloud_points(reader.deserialize(raw, connection.msgtype))  # fields it cannot read: refused now
                break
            if self.camera is None:
                raise BagError("--hints-topic needs a camera to project the cloud into the image: a CameraInfo topic "
                               "(--camera-info-topic) or --intrinsics")

        kind = self._model_kind()
        self.points = self.camera is not None and (kind == "metric" or self.hints_topic is not None)
        if self.camera is None:
            self._note(f"no point clouds: no calibrated CameraInfo on {self.info_topic}" if self.info_topic else
                       f"no point clouds: no camera (no {sibling_camera_info(self.image_topic)} in the bag, no "
                       "--camera-info-topic, no --intrinsics)")
        elif not self.points:
            self._note(f"no point clouds: the model gives {kind or 'unknown'} depth, not metres; give --hints-topic "
                       "or use a metric model")
        elif kind != "metric":
            self._note(f"the model gives {kind} depth: frames without 3 usable hints get no depth and count as failed, "
                       "since points need metres")

        default_depth, default_points = default_topics(self.image_topic)
        self.depth_topic = args.depth_topic or default_depth
        self.points_topic = args.points_topic or default_points
        self.kind_topic = kind_topic(self.depth_topic)
        ours = [self.depth_topic, self.kind_topic] + ([self.points_topic] if self.points else [])
        if len(set(ours)) != len(ours):
            raise BagError(f"the output topics must differ: {', '.join(ours)}")
        clash = [name for name in ours if name in topics]
        if clash and not args.no_copy:
            raise BagError(f"the input already has {', '.join(clash)}: give --depth-topic/--points-topic, or --no-copy")

    def _topic(self, topics: dict[str, Any], name: str, msgtype: str, flag: str) -> list[Any]:
        info = topics.get(name)
        if info is None:
            raise BagError(f"{flag}: no topic {name} in {self.args.input}")
        if info.msgtype != msgtype:
            raise BagError(f"{flag}: {name} is {info.msgtype or 'of several types'}, not {msgtype}")
        return info.connections

    def _check_first_image(self, reader: Any, connections: list[Any]) -> None:
        for connection, _, raw in reader.messages(connections=connections):
            problem = image_problem(reader.deserialize(raw, connection.msgtype), connection.msgtype)
            if problem:
                raise BagError(f"{self.image_topic}: {problem}")
            return

    @staticmethod
    def _first_camera(reader: Any, connections: list[Any]) -> Camera | None:
        for connection, _, raw in reader.messages(connections=connections):
            camera = camera_of(reader.deserialize(raw, connection.msgtype))
            if camera is not None:
                return camera
        return None

    def _model_kind(self) -> str:
        models = self.client.models()
        for info in models:
            if info.name == self.args.model or (not self.args.model and info.is_default):
                return info.kind
        raise BagError(f"the daemon serves no model {self.args.model!r}: it has {', '.join(m.name for m in models)}")

    # -- the feed: on gRPC's thread, one frame per sampled image

    def _frames(self, reader: Any, sent: queue.Queue[Sent], stop: threading.Event) -> Iterator[StreamFrame]:
        topics = reader.topics
        wanted = list(topics[self.image_topic].connections)
        for extra in (self.info_topic if self.args.intrinsics is None else None, self.hints_topic):
            if extra is not None:
                wanted += topics[extra].connections
        camera, cloud, cloud_hints = self.camera, None, None
        warned_frame = False
        index = -1
        for connection, log_time, raw in reader.messages(connections=wanted):
            if stop.is_set():
                return
            if connection.topic == self.info_topic and self.args.intrinsics is None:
                camera = camera_of(reader.deserialize(raw, connection.msgtype)) or camera
                continue
            if connection.topic == self.hints_topic:
                cloud, cloud_hints = reader.deserialize(raw, connection.msgtype), None
                continue
            index += 1
            if index % self.args.stride:
                continue
            msg = reader.deserialize(raw, connection.msgtype)
            if image_problem(msg, connection.msgtype):
                continue  # the writer finds the same problem in the same message, and reports it
            image, pixel_format, width, height = frame_of(msg, connection.msgtype)
            if not width and camera is not None:
                width, height = camera.width, camera.height
            intrinsics = camera.for_size(width, height) if camera is not None else None
            hints = None
            if cloud is not None and intrinsics is not None:
                if cloud.header.frame_id != msg.header.frame_id:
                    if not warned_frame:
                        self._note(f"hints not used: {self.hints_topic} is in frame {cloud.header.frame_id!r}, the "
                                   f"images in {msg.header.frame_id!r} (the cloud must be in the camera's optical frame)")
                        warned_frame = True
                else:
                    if cloud_hints is None or cloud_hints[0] != intrinsics:
                        cloud_hints = (intrinsics, project_hints(cloud_points(cloud), intrinsics, width, height))
                    hints = cloud_hints[1]
            stamp = msg.header.stamp
            item = Sent(index, log_time, int(stamp.sec), int(stamp.nanosec), str(msg.header.frame_id))
            while True:  # wait for the writer (bounded in flight), but not for one that has stopped
                if stop.is_set():
                    return
                try:
                    sent.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue
            yield StreamFrame(image, frame_id=index, timestamp_ns=item.sec * 1_000_000_000 + item.nanosec,
                              pixel_format=pixel_format, intrinsics=intrinsics, hints=hints)

    # -- the writer: this thread, every message in log-time order

    def _write(self, feed: Any, main: Any, path: Path) -> Path:
        from rosbags.rosbag2 import StoragePlugin, Writer

        args = self.args
        copied = [] if args.no_copy else list(main.connections)
        store, refused = output_typestore(main, copied)
        for msgtype, why in refused.items():
            self._note(f"not copied: the topics of type {msgtype} ({why})")
        copied = [connection for connection in copied if connection.msgtype not in refused]
        image_connections = [c for c in main.connections if c.topic == self.image_topic]
        reading = copied + [c for c in image_connections if c not in copied]

        sent: queue.Queue[Sent] = queue.Queue(maxsize=IN_FLIGHT)
        stop = threading.Event()
        writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
        try:
            with writer:
                outputs = self._connections(writer, store, main, copied)
                convert: Callable[[Any, bytes], Any] = (
                    (lambda connection, raw: raw) if main.is2
                    else (lambda connection, raw: store.ros1_to_cdr(raw, connection.msgtype)))
                results = self.client.stream(
                    self._frames(feed, sent, stop), model=args.model, point_cloud=self.points,
                    point_cloud_rgb=self.points and args.rgb)
                self.started = time.monotonic()
                try:
                    for connection, log_time, raw in main.messages(connections=reading):
                        self.counts.messages += 1
                        if connection.id in outputs["copy"]:
                            writer.write(outputs["copy"][connection.id], log_time, convert(connection, raw))
                            self.counts.copied += 1
                        if connection.topic == self.image_topic:
                            self._image(main, connection, log_time, raw, results, sent, writer, store, outputs)
                    if next(results, None) is not None:
                        raise RuntimeError("the stream answered more frames than were sent")
                finally:
                    stop.set()
                    results.close()  # type: ignore[attr-defined]
                self.elapsed = time.monotonic() - self.started
                writer.set_custom_data("depthd.model", self.model)
                writer.set_custom_data("depthd.image_topic", self.image_topic)
                writer.set_custom_data("depthd.depth_topic", self.depth_topic)
                writer.set_custom_data("depthd.kind", ",".join(sorted(self.kinds)))
                writer.set_custom_data("depthd.kind_topic", self.kind_topic)
        finally:
            if self.progress_total and sys.stderr.isatty():
                sys.stderr.write("\n")
        return path / f"{path.name}.mcap"

    def _connections(self, writer: Any, store: Any, reader: Any, copied: list[Any]) -> dict[str, Any]:
        from rosbags.interfaces import ConnectionExtRosbag2

        by_name: dict[tuple[str, str], Any] = {}
        copies: dict[int, Any] = {}
        for connection in copied:
            key = (connection.topic, connection.msgtype)
            if key not in by_name:
                ext = connection.ext
                if isinstance(ext, ConnectionExtRosbag2):
                    qos, serialization = ext.offered_qos_profiles, ext.serialization_format
                else:
                    qos, serialization = (_latched() if ext.latching else []), "cdr"
                by_name[key] = writer.add_connection(connection.topic, connection.msgtype, typestore=store,
                                                     serialization_format=serialization, offered_qos_profiles=qos)
            copies[connection.id] = by_name[key]
        outputs: dict[str, Any] = {
            "copy": copies,
            "depth": writer.add_connection(self.depth_topic, IMAGE, typestore=store),
            "kind": writer.add_connection(self.kind_topic, STRING, typestore=store),
        }
        if self.points:
            outputs["points"] = writer.add_connection(self.points_topic, POINT_CLOUD2, typestore=store)
        return outputs

    def _image(self, reader: Any, connection: Any, log_time: int, raw: bytes, results: Iterator[DepthResult],
               sent: queue.Queue[Sent], writer: Any, store: Any, outputs: dict[str, Any]) -> None:
        index = self.counts.images
        self.counts.images += 1
        try:
            if index % self.args.stride:
                return
            problem = image_problem(reader.deserialize(raw, connection.msgtype), connection.msgtype)
            if problem:
                self._failed(index, log_time, problem)
                return
            result = next(results, None)
            if result is None:
                raise RuntimeError("the stream ended before every frame was answered")
            try:
                item = sent.get_nowait()
            except queue.Empty:
                item = None
            if item is None or item.index != index or item.log_time != log_time or result.frame_id != index:
                raise RuntimeError(f"the stream's answers are out of step with the bag at image {index}")
            self.counts.sent += 1
            self.model = self.model or result.model
            if result.error is not None:
                self._failed(index, log_time, f"{result.error.code.name}: {result.error.message}")
                return
            if result.depth is None:
                self._failed(index, log_time, "no depth map in the answer")
                return
            self._write_result(item, result, writer, store, outputs)
        finally:
            self._progress()

    def _write_result(self, item: Sent, result: DepthResult, writer: Any, store: Any, outputs: dict[str, Any]) -> None:
        types = store.types
        header = types["std_msgs/msg/Header"](
            stamp=types["builtin_interfaces/msg/Time"](sec=item.sec, nanosec=item.nanosec), frame_id=item.frame_id)
        depth = np.ascontiguousarray(result.depth, dtype="<f4")
        height, width = depth.shape
        image = types[IMAGE](header=header, height=height, width=width, encoding="32FC1", is_bigendian=0,
                             step=width * 4, data=depth.view(np.uint8).reshape(-1))
        writer.write(outputs["depth"], item.log_time, bytes(store.serialize_cdr(image, IMAGE)))
        text = KIND_TEXT.get(result.kind, f"{result.kind}: unknown kind")
        writer.write(outputs["kind"], item.log_time, bytes(store.serialize_cdr(types[STRING](data=text), STRING)))
        self.kinds.add(result.kind)
        self.counts.depth += 1
        if result.points is not None and "points" in outputs:
            cloud = point_cloud(types, header, result.points, result.points_rgb if self.args.rgb else None)
            writer.write(outputs["points"], item.log_time, bytes(store.serialize_cdr(cloud, POINT_CLOUD2)))
            self.counts.points += 1

    # -- saying what happens

    def _failed(self, index: int, log_time: int, why: str) -> None:
        self.counts.failed += 1
        if self.errors_shown < ERRORS_SHOWN:
            self._note(f"{self.image_topic} image {index} (log time {log_time}): {why}")
        elif self.errors_shown == ERRORS_SHOWN:
            self._note("more failed frames are not shown")
        self.errors_shown += 1

    def _note(self, text: str) -> None:
        lead = "\n" if self.started and sys.stderr.isatty() else ""
        print(f"{lead}depthctl bag: {text}", file=sys.stderr)

    def _progress(self) -> None:
        if not sys.stderr.isatty():
            return
        done, total = self.counts.images, max(self.progress_total, self.counts.images)
        elapsed = time.monotonic() - self.started
        fps = self.counts.depth / elapsed if elapsed > 0 else 0.0
        sys.stderr.write(f"\r{progress.bar(done, total)} images, {fps:.1f} fps")
        sys.stderr.flush()

    def _summary(self, output: Path) -> None:
        c = self.counts
        elapsed = getattr(self, "elapsed", 0.0)
        fps = c.depth / elapsed if elapsed > 0 else 0.0
        kinds = ", ".join(sorted(self.kinds)) or "none"
        print(f"{c.messages} messages read ({c.images} images on {self.image_topic}, {c.sent} sent), {c.copied} copied; "
              f"{c.depth} depth images ({kinds}) and {c.points} point clouds written, {c.failed} failed; "
              f"{fps:.1f} fps ({c.depth} results in {elapsed:.2f} s) -> {output}", file=sys.stderr)


def point_cloud(types: Any, header: Any, points: np.ndarray, colours: np.ndarray | None) -> Any:
    """An organized sensor_msgs/PointCloud2 of HxWx3 points: x, y, z float32 and, with `colours` (HxWx3
    uint8), rgb packed as PCL and RViz read it (0x00RRGGBB, its bits stored as a float32)."""
    field = types["sensor_msgs/msg/PointField"]
    height, width = points.shape[:2]
    names = ["x", "y", "z"] + (["rgb"] if colours is not None else [])
    record = np.empty((height, width), dtype=np.dtype({
        "names": names, "formats": ["<f4"] * len(names), "offsets": [4 * i for i in range(len(names))],
        "itemsize": 4 * len(names)}))
    for axis, name in enumerate("xyz"):
        record[name] = points[..., axis]
    if colours is not None:
        c = colours.astype(np.uint32)
        record["rgb"] = ((c[..., 0] << 16) | (c[..., 1] << 8) | c[..., 2]).view("<f4")
    step = record.dtype.itemsize
    return types[POINT_CLOUD2](
        header=header, height=height, width=width,
        fields=[field(name=name, offset=4 * i, datatype=FLOAT32, count=1) for i, name in enumerate(names)],
        is_bigendian=False, point_step=step, row_step=step * width, data=record.view(np.uint8).reshape(-1),
        is_dense=bool(np.isfinite(points).all()))
