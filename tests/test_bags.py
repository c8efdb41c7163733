"""`depthctl bag` against a real daemon: bags written here with rosbags (ROS 2 MCAP and ROS 1), run
through the command, and read back: depth and points beside the camera, with the images' headers,
as `estimate` gives them, the input copied, the kind said, and what cannot be used refused."""

from __future__ import annotations

import io
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from daemon import serving
from PIL import Image
from scenes import scene

from depthd.config import Limits, ModelSettings, Settings
from depthd_client import DepthClient
from depthd_client.bags import Camera, camera_namespace, default_topics, kind_topic, sibling_camera_info
from depthd_client.cli import main as depthctl

pytest.importorskip("rosbags")
from rosbags.highlevel import AnyReader  # noqa: E402
from rosbags.rosbag1 import Writer as Writer1  # noqa: E402
from rosbags.rosbag2 import StoragePlugin, Writer  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402

W, H = 64, 48
CAMERA = (50.0, 52.0, 31.5, 23.5)  # fx, fy, cx, cy
FRAME = "cam_optical"
IMAGES = "/cam/color/image_raw"
INFO = "/cam/color/camera_info"


@pytest.fixture(scope="module")
def daemon(tiny_models):
    settings = Settings(
        listen=("127.0.0.1:0",),
        models=(
            ModelSettings("metric", str(tiny_models["depth_anything_metric"]), warmup_sizes=((H, W),)),
            ModelSettings("rel", str(tiny_models["depth_anything"]), warmup_sizes=((H, W),)),
        ),
        limits=Limits(),
    )
    running = serving(settings)
    yield running
    running.stop()


def stamp(i: int) -> tuple[int, int]:
    return 1_700_000_000 + i // 10, (i % 10) * 100_000_000 + 7


def log_time(i: int) -> int:
    sec, nanosec = stamp(i)
    return sec * 1_000_000_000 + nanosec + 3_000_000  # logged 3 ms after the capture


def pixels(i: int) -> np.ndarray:
    return scene(W, H, seed=i)


def raw_image(types, i: int, encoding: str, pad: int = 0):
    """Frame i as an Image message in `encoding`, each row padded with `pad` bytes."""
    rgb = pixels(i)
    array = {"rgb8": rgb, "bgr8": rgb[..., ::-1], "mono8": rgb[..., 1], "16UC1": rgb[..., :2]}[encoding]
    rows = np.ascontiguousarray(array).reshape(H, -1)
    rows = np.concatenate([rows, np.full((H, pad), 255, np.uint8)], axis=1)
    sec, nanosec = stamp(i)
    header = types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec),
                                          frame_id=FRAME)
    return types["sensor_msgs/msg/Image"](header=header, height=H, width=W, encoding=encoding, is_bigendian=0,
                                          step=rows.shape[1], data=rows.reshape(-1))


def camera_info(types, ros1: bool = False):
    fx, fy, cx, cy = CAMERA
    time = types["builtin_interfaces/msg/Time"](sec=1, nanosec=0)
    header = types["std_msgs/msg/Header"](**({"seq": 0} if ros1 else {}), stamp=time, frame_id=FRAME)
    matrices = {"d": np.zeros(5), "k": np.array([fx, 0, cx, 0, fy, cy, 0, 0, 1.0]), "r": np.eye(3).reshape(-1),
                "p": np.array([fx, 0, cx, 0, 0, fy, cy, 0, 0, 0, 1.0, 0])}
    if ros1:
        matrices = {name.upper(): value for name, value in matrices.items()}
    roi = types["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    return types["sensor_msgs/msg/CameraInfo"](header=header, height=H, width=W, distortion_model="plumb_bob",
                                               binning_x=0, binning_y=0, roi=roi, **matrices)


def write_bag(path: Path, count: int, encoding: str = "rgb8", pad: int = 0, info: bool = True, hints=None) -> Path:
    """A ROS 2 MCAP bag (a folder; its .mcap file is returned): `count` images on IMAGES, one CameraInfo on
    INFO logged before them, and with `hints` ((frame_id, Nx3 points)) one PointCloud2 on /lidar/points."""
    store = get_typestore(Stores.ROS2_HUMBLE)
    types = store.types
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        images = writer.add_connection(IMAGES, "sensor_msgs/msg/Image", typestore=store)
        if info:
            infos = writer.add_connection(INFO, "sensor_msgs/msg/CameraInfo", typestore=store)
            writer.write(infos, log_time(0) - 1_000_000, store.serialize_cdr(camera_info(types), "sensor_msgs/msg/CameraInfo"))
        if hints is not None:
            clouds = writer.add_connection("/lidar/points", "sensor_msgs/msg/PointCloud2", typestore=store)
            message = store.serialize_cdr(cloud(types, *hints), "sensor_msgs/msg/PointCloud2")
            writer.write(clouds, log_time(0) - 1_000_000, message)
        for i in range(count):
            writer.write(images, log_time(i), store.serialize_cdr(raw_image(types, i, encoding, pad), "sensor_msgs/msg/Image"))
    return path / f"{path.name}.mcap"


def cloud(types, frame_id: str, points: np.ndarray):
    """An unorganized PointCloud2 of float32 x, y, z with a 4-byte pad per point (point_step 16)."""
    record = np.zeros(len(points), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("pad", "<f4")])
    record["x"], record["y"], record["z"] = points.T
    field = types["sensor_msgs/msg/PointField"]
    header = types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](sec=1, nanosec=0), frame_id=frame_id)
    return types["sensor_msgs/msg/PointCloud2"](
        header=header, height=1, width=len(points), is_bigendian=False, point_step=16, row_step=16 * len(points),
        fields=[field(name=n, offset=4 * k, datatype=7, count=1) for k, n in enumerate("xyz")],
        data=record.view(np.uint8).reshape(-1), is_dense=True)


def read_bag(path: Path) -> tuple[dict[str, list], dict[str, str]]:
    """topic -> [(log time, message)], and topic -> message type."""
    messages: dict[str, list] = defaultdict(list)
    with AnyReader([path]) as reader:
        kinds = {connection.topic: connection.msgtype for connection in reader.connections}
        for connection, t, raw in reader.messages():
            messages[connection.topic].append((t, reader.deserialize(raw, connection.msgtype)))
    return messages, kinds


def depth_of(msg) -> np.ndarray:
    assert msg.encoding == "32FC1" and msg.is_bigendian == 0 and msg.step == msg.width * 4
    return np.frombuffer(msg.data.tobytes(), "<f4").reshape(msg.height, msg.width)


def cloud_of(msg) -> np.ndarray:
    return np.frombuffer(msg.data.tobytes(), np.uint8).reshape(msg.height, msg.width, msg.point_step)


def run_bag(daemon, *args: str) -> int:
    return depthctl(["--target", daemon.address, "bag", *args])


def test_topic_names_follow_ros():
    assert camera_namespace("/cam/color/image_raw") == "/cam"
    assert camera_namespace("/cam/image_raw") == "/cam"
    assert camera_namespace("/cam/image_raw/compressed") == "/cam"
    assert camera_namespace("/robot/front/rgb/image_rect_color") == "/robot/front"
    assert camera_namespace("/stereo/left/image_rect") == "/stereo/left"
    assert camera_namespace("/image_raw") == ""
    assert default_topics("/cam/color/image_raw") == ("/cam/depth/image_raw", "/cam/depth/points")
    assert default_topics("/image") == ("/depth/image_raw", "/depth/points")
    assert sibling_camera_info("/cam/color/image_raw/compressed") == "/cam/color/camera_info"
    assert kind_topic("/cam/depth/image_raw") == "/cam/depth/kind"
    # a camera calibrated at another size is scaled to the image's
    assert Camera(100, 100, 63.5, 47.5, 128, 96).for_size(64, 48) == (50, 50, 31.5, 23.5)
    assert Camera(100, 100, 63.5, 47.5, 0, 0).for_size(64, 48) == (100, 100, 63.5, 47.5)


def test_without_rosbags_the_command_says_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "rosbags.highlevel", None)
    assert depthctl(["--target", "127.0.0.1:9", "bag", str(tmp_path), "-o", str(tmp_path / "o.mcap"),
                     "--image-topic", IMAGES]) == 2
    assert "pip install 'depthd-client[bags]'" in capsys.readouterr().err


def test_bag_gets_depth_and_points_beside_the_camera_with_the_images_headers(daemon, tmp_path, capsys):
    source = write_bag(tmp_path / "in", 20)
    out = tmp_path / "out.mcap"
    assert run_bag(daemon, str(source), "-o", str(out), "--image-topic", IMAGES, "--model", "metric", "--rgb") == 0
    summary = capsys.readouterr().err
    assert "20 depth images (metric) and 20 point clouds written, 0 failed" in summary

    messages, types = read_bag(out)
    assert types["/cam/depth/image_raw"] == "sensor_msgs/msg/Image"
    assert types["/cam/depth/points"] == "sensor_msgs/msg/PointCloud2"
    assert types["/cam/depth/kind"] == "std_msgs/msg/String"
    depths, clouds, kinds = messages["/cam/depth/image_raw"], messages["/cam/depth/points"], messages["/cam/depth/kind"]
    assert len(depths) == len(clouds) == len(kinds) == 20
    # the input, copied: same log times, same bytes
    assert [t for t, _ in messages[IMAGES]] == [log_time(i) for i in range(20)]
    assert all(np.array_equal(m.data, raw_image(get_typestore(Stores.ROS2_HUMBLE).types, i, "rgb8").data)
               for i, (_, m) in enumerate(messages[IMAGES]))
    assert len(messages[INFO]) == 1 and list(messages[INFO][0][1].k) == [50, 0, 31.5, 0, 52, 23.5, 0, 0, 1]

    with DepthClient(daemon.address) as client:
        for i in (0, 7, 19):
            expected = client.estimate(pixels(i), model="metric", point_cloud=True, point_cloud_rgb=True, intrinsics=CAMERA)
            (t_depth, depth), (t_cloud, points), (t_kind, kind) = depths[i], clouds[i], kinds[i]
            assert t_depth == t_cloud == t_kind == log_time(i)
            for msg in (depth, points):
                assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == stamp(i)
                assert msg.header.frame_id == FRAME
            assert kind.data.startswith("metric:")
            got = depth_of(depth)
            # (a tiny random metric head gives a few slightly negative "metres": the values are the model's)
            assert got.shape == (H, W) and np.isfinite(got).all() and got.std() > 0
            np.testing.assert_allclose(got, expected.depth, rtol=1e-3, atol=1e-4)
            # the cloud: organized, x y z float32 then a packed rgb
            assert (points.height, points.width, points.point_step, points.row_step) == (H, W, 16, 16 * W)
            assert [(f.name, f.offset, f.datatype, f.count) for f in points.fields] == [
                ("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1), ("rgb", 12, 7, 1)]
            assert points.is_dense == bool(np.isfinite(expected.points).all())
            data = cloud_of(points)
            xyz = data[..., :12].copy().view("<f4")
            np.testing.assert_allclose(xyz, expected.points, rtol=1e-3, atol=1e-4)
            rgb = data[..., 12:16].copy().view("<u4")[..., 0]
            colours = np.stack([(rgb >> 16) & 255, (rgb >> 8) & 255, rgb & 255], axis=-1)
            np.testing.assert_array_equal(colours, expected.points_rgb)


@pytest.mark.parametrize("encoding", ["bgr8", "mono8"])
def test_bag_reads_bgr_and_mono_rows_with_padding_every_nth_without_copying(daemon, tmp_path, encoding, capsys):
    source = write_bag(tmp_path / "in", 5, encoding=encoding, pad=8, info=False)
    out = tmp_path / "out.mcap"
    assert run_bag(daemon, str(source.parent), "-o", str(out), "--image-topic", IMAGES, "--model", "metric",
                   "--stride", "2", "--no-copy", "--intrinsics", ",".join(map(str, CAMERA)),
                   "--depth-topic", "/d/depth", "--points-topic", "/d/cloud") == 0
    assert "3 depth images (metric) and 3 point clouds written" in capsys.readouterr().err
    messages, _ = read_bag(out)
    assert set(messages) == {"/d/depth", "/d/cloud", "/d/kind"}
    with DepthClient(daemon.address) as client:
        for k, i in enumerate((0, 2, 4)):
            t, msg = messages["/d/depth"][k]
            assert t == log_time(i) and (msg.header.stamp.sec, msg.header.stamp.nanosec) == stamp(i)
            frame = pixels(i) if encoding == "bgr8" else pixels(i)[..., 1]
            expected = client.estimate(frame, model="metric", pixel_format="rgb8" if encoding == "bgr8" else "gray8")
            np.testing.assert_allclose(depth_of(msg), expected.depth, rtol=1e-3, atol=1e-4)
            assert [f.name for f in messages["/d/cloud"][k][1].fields] == ["x", "y", "z"]


def test_bag_refuses_an_unsupported_encoding_and_an_existing_output(daemon, tmp_path, capsys):
    source = write_bag(tmp_path / "in", 2, encoding="16UC1")
    out = tmp_path / "out.mcap"
    assert run_bag(daemon, str(source), "-o", str(out), "--image-topic", IMAGES) == 2
    err = capsys.readouterr().err
    assert "'16UC1' is not supported" in err and "rgb8, bgr8" in err and "mono8" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "in"]

    good = write_bag(tmp_path / "good", 2)
    out.write_bytes(b"keep me")
    assert run_bag(daemon, str(good), "-o", str(out), "--image-topic", IMAGES) == 2
    assert "give --overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert run_bag(daemon, str(good), "-o", str(out), "--image-topic", IMAGES, "--overwrite", "--model", "metric") == 0
    assert len(read_bag(out)[0]["/cam/depth/image_raw"]) == 2
    assert run_bag(daemon, str(good), "-o", str(tmp_path / "other.mcap"), "--image-topic", "/nope") == 2
    assert f"no topic /nope in {good}; its image topics: {IMAGES}" in capsys.readouterr().err


def test_a_relative_models_depth_says_its_kind_and_gets_no_points(daemon, tmp_path, capsys):
    source = write_bag(tmp_path / "in", 3)
    out = tmp_path / "out.mcap"
    assert run_bag(daemon, str(source), "-o", str(out), "--image-topic", IMAGES, "--model", "rel") == 0
    err = capsys.readouterr().err
    assert "no point clouds: the model gives relative_disparity depth" in err
    messages, types = read_bag(out)
    kinds = [msg.data for _, msg in messages["/cam/depth/kind"]]
    assert len(kinds) == 3 and all(k.startswith("relative_disparity: NOT metres") for k in kinds)
    assert len(messages["/cam/depth/image_raw"]) == 3 and "/cam/depth/points" not in types


def test_hints_from_a_cloud_in_the_camera_frame_are_projected_and_sent(daemon, tmp_path, capsys):
    with DepthClient(daemon.address) as client:
        plain = client.estimate(pixels(0), model="metric").depth
    # true depths: twice the model's, at a grid of pixels, as points in the optical frame
    fx, fy, cx, cy = CAMERA
    v, u = np.mgrid[4:H:8, 4:W:8].reshape(2, -1)
    z = 2.0 * plain[v, u]
    points = np.stack([(u - cx) * z / fx, (v - cy) * z / fy, z], axis=-1)
    hints = np.stack([u, v, z], axis=-1).astype(np.float64)
    with DepthClient(daemon.address) as client:
        expected = client.estimate(pixels(0), model="metric", hints=hints, intrinsics=CAMERA).depth
    assert not np.allclose(expected, plain, rtol=0.1)  # the hints change the map

    source = write_bag(tmp_path / "in", 1, hints=(FRAME, points))
    out = tmp_path / "out.mcap"
    assert run_bag(daemon, str(source), "-o", str(out), "--image-topic", IMAGES, "--model", "metric",
                   "--hints-topic", "/lidar/points") == 0
    got = depth_of(read_bag(out)[0]["/cam/depth/image_raw"][0][1])
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)

    elsewhere = write_bag(tmp_path / "lidar", 1, hints=("lidar", points))
    out2 = tmp_path / "out2.mcap"
    assert run_bag(daemon, str(elsewhere), "-o", str(out2), "--image-topic", IMAGES, "--model", "metric",
                   "--hints-topic", "/lidar/points") == 0
    assert "hints not used: /lidar/points is in frame 'lidar'" in capsys.readouterr().err
    np.testing.assert_allclose(depth_of(read_bag(out2)[0]["/cam/depth/image_raw"][0][1]), plain, rtol=1e-3, atol=1e-4)


def test_a_ros1_bag_is_copied_as_ros2_messages(daemon, tmp_path):
    store = get_typestore(Stores.ROS1_NOETIC)
    types = store.types
    source = tmp_path / "in.bag"
    with Writer1(source) as writer:
        info = writer.add_connection(INFO, "sensor_msgs/msg/CameraInfo", typestore=store, latching=1)
        writer.write(info, log_time(0) - 1, store.serialize_ros1(camera_info(types, ros1=True), "sensor_msgs/msg/CameraInfo"))
        images = writer.add_connection(IMAGES, "sensor_msgs/msg/Image", typestore=store)
        for i in range(3):
            msg = raw_image(get_typestore(Stores.ROS2_HUMBLE).types, i, "rgb8")
            header = types["std_msgs/msg/Header"](seq=i, stamp=types["builtin_interfaces/msg/Time"](
                sec=msg.header.stamp.sec, nanosec=msg.header.stamp.nanosec), frame_id=FRAME)
            ros1 = types["sensor_msgs/msg/Image"](header=header, height=H, width=W, encoding="rgb8", is_bigendian=0,
                                                  step=msg.step, data=msg.data)
            writer.write(images, log_time(i), store.serialize_ros1(ros1, "sensor_msgs/msg/Image"))
    out = tmp_path / "out.mcap"
    assert run_bag(daemon, str(source), "-o", str(out), "--image-topic", IMAGES, "--model", "metric") == 0
    messages, _ = read_bag(out)
    assert [m.header.frame_id for _, m in messages[IMAGES]] == [FRAME] * 3
    assert np.array_equal(messages[IMAGES][2][1].data, pixels(2).reshape(-1))
    assert list(messages[INFO][0][1].k)[:3] == [50, 0, 31.5]
    assert len(messages["/cam/depth/points"]) == 3
    assert [(m.header.stamp.sec, m.header.stamp.nanosec) for _, m in messages["/cam/depth/image_raw"]] == \
        [stamp(i) for i in range(3)]


def test_compressed_images_are_sent_as_files_and_find_their_sibling_camera_info(daemon, tmp_path):
    store = get_typestore(Stores.ROS2_HUMBLE)
    types = store.types
    topic, info_topic = "/cam/image_raw/compressed", "/cam/camera_info"
    files = []
    with Writer(tmp_path / "in", version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        infos = writer.add_connection(info_topic, "sensor_msgs/msg/CameraInfo", typestore=store)
        writer.write(infos, log_time(0) + 1, store.serialize_cdr(camera_info(types), "sensor_msgs/msg/CameraInfo"))
        images = writer.add_connection(topic, "sensor_msgs/msg/CompressedImage", typestore=store)
        for i in range(3):
            png = io.BytesIO()
            Image.fromarray(pixels(i)).save(png, format="PNG")
            files.append(png.getvalue())
            header = raw_image(types, i, "rgb8").header
            msg = types["sensor_msgs/msg/CompressedImage"](header=header, format="png",
                                                           data=np.frombuffer(files[-1], np.uint8))
            writer.write(images, log_time(i), store.serialize_cdr(msg, "sensor_msgs/msg/CompressedImage"))
    out = tmp_path / "out.mcap"
    # the CameraInfo comes 1 ns after the first image: the first image uses it too (the first one in the bag)
    assert run_bag(daemon, str(tmp_path / "in"), "-o", str(out), "--image-topic", topic, "--model", "metric") == 0
    messages, _ = read_bag(out)
    assert len(messages["/cam/depth/points"]) == 3
    with DepthClient(daemon.address) as client:
        for i in range(3):
            expected = client.estimate(files[i], model="metric", point_cloud=True, intrinsics=CAMERA)
            np.testing.assert_allclose(depth_of(messages["/cam/depth/image_raw"][i][1]), expected.depth, rtol=1e-3, atol=1e-4)
            xyz = cloud_of(messages["/cam/depth/points"][i][1]).copy().view("<f4")
            np.testing.assert_allclose(xyz, expected.points, rtol=1e-3, atol=1e-4)


def test_frames_the_daemon_fails_are_counted_and_the_bag_goes_on(daemon, tmp_path, capsys):
    # a relative model asked for points with hints it cannot use (the cloud is not in the camera's frame):
    # the daemon fails each frame; the input is still copied, and the exit code says so
    points = np.array([[0.0, 0.0, 2.0], [0.1, 0.0, 2.0], [0.0, 0.1, 2.0]])
    source = write_bag(tmp_path / "in", 3, hints=("lidar", points))
    out = tmp_path / "out.mcap"
    assert run_bag(daemon, str(source), "-o", str(out), "--image-topic", IMAGES, "--model", "rel",
                   "--hints-topic", "/lidar/points") == 1
    err = capsys.readouterr().err
    assert err.count("INVALID_ARGUMENT") == 3 and "0 depth images (none) and 0 point clouds written, 3 failed" in err
    messages, types = read_bag(out)
    assert len(messages[IMAGES]) == 3 and "/cam/depth/image_raw" not in messages
    assert types["/cam/depth/points"] == "sensor_msgs/msg/PointCloud2"
