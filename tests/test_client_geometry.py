"""The client's side of geometry (camera intrinsics, depth hints, point clouds, alignment, stabilized
streams, a fixed visualization range), without the daemon's own: request building puts every option in
its proto field (stream-wide or per frame), responses built by hand come back as `DepthResult`s, the PLY
writer's files parse back with a reader of the test's own, depthctl reads its hints CSV and checks its
flags, and a small fake gRPC server carries all of it over real sync and asyncio calls."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from depthd_client import (
    Alignment,
    AsyncDepthClient,
    CameraIntrinsics,
    DepthClient,
    DepthResult,
    StreamFrame,
    build_request,
    files,
    to_result,
)
from depthd_client.cli import main as depthctl
from depthd_client.messages import StreamRequests
from depthd_client.v1 import depth_pb2 as pb
from depthd_client.v1 import depth_pb2_grpc

FRAME = b"\x89PNG not really: the fake server does not decode"
PIXELS = np.zeros((4, 6, 3), dtype=np.uint8)
K = (500.0, 510.0, 320.5, 240.25)
HINTS = [(10.0, 20.0, 1.5), (30.5, 40.0, 2.25), (50.0, 60.0, 3.0)]


# --- a reader of the test's own: a PLY as the standard says, header and binary body ----------------

PLY_TYPES = {"char": "i1", "uchar": "u1", "short": "<i2", "ushort": "<u2", "int": "<i4", "uint": "<u4",
             "float": "<f4", "double": "<f8"}


def read_ply(path: Path) -> tuple[dict[str, object], np.ndarray]:
    """(header facts, vertices as a structured array) of a binary little-endian PLY with one element."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    lines = data[:end].decode("ascii").splitlines()
    assert lines[0] == "ply"
    header: dict[str, object] = {"comments": [], "properties": []}
    for line in lines[1:-1]:
        word, *rest = line.split()
        if word == "format":
            header["format"] = " ".join(rest)
        elif word == "comment":
            header["comments"].append(" ".join(rest))  # type: ignore[union-attr]
        elif word == "element":
            assert "element" not in header, "one element, vertex"
            header["element"], header["count"] = rest[0], int(rest[1])
        elif word == "property":
            kind, name = rest
            header["properties"].append((name, PLY_TYPES[kind]))  # type: ignore[union-attr]
        else:
            raise AssertionError(f"unknown header line {line!r}")
    assert lines[-1] == "end_header"
    dtype = np.dtype(header["properties"])  # type: ignore[arg-type]
    body = data[end:]
    assert len(body) == dtype.itemsize * header["count"], "the element count matches the body"  # type: ignore[operator]
    return header, np.frombuffer(body, dtype=dtype)


# --- requests --------------------------------------------------------------------------------------


def test_every_option_lands_in_its_field():
    request = build_request(
        PIXELS, intrinsics=K, hints=HINTS, stabilize=True, point_cloud=True, point_stride=4, point_cloud_rgb=True,
        vis_min=0.5, vis_max=12.0, visualization=True, frame_id=9,
    )
    assert (request.intrinsics.fx, request.intrinsics.fy, request.intrinsics.cx, request.intrinsics.cy) == K
    assert [(h.x, h.y, h.depth_m) for h in request.hints] == HINTS
    assert request.stabilize and request.frame_id == 9
    out = request.output
    assert (out.point_cloud, out.point_stride, out.point_cloud_rgb, out.visualization) == (True, 4, True, True)
    assert (out.vis_min, out.vis_max) == (0.5, 12.0)


def test_options_left_out_leave_their_fields_unset():
    request = build_request(PIXELS)
    assert not request.HasField("intrinsics") and len(request.hints) == 0 and not request.stabilize
    assert not request.output.point_cloud and request.output.point_stride == 0 and not request.output.point_cloud_rgb
    assert (request.output.vis_min, request.output.vis_max) == (0.0, 0.0)


@pytest.mark.parametrize("intrinsics", [
    K, list(K), np.array(K), np.array(K, dtype=np.float32), CameraIntrinsics(*K), (500, 510, 320.5, 240.25),
])
def test_intrinsics_as_any_four_numbers_or_the_dataclass(intrinsics):
    c = build_request(PIXELS, intrinsics=intrinsics).intrinsics
    assert (c.fx, c.fy, c.cx, c.cy) == K


@pytest.mark.parametrize("hints", [
    HINTS, tuple(HINTS), [list(h) for h in HINTS], (h for h in HINTS), np.array(HINTS), np.array(HINTS, dtype=np.float32),
    list(np.array(HINTS)),
])
def test_hints_as_triples_or_an_nx3_array(hints):
    assert [(h.x, h.y, h.depth_m) for h in build_request(PIXELS, hints=hints).hints] == HINTS


def test_no_hints_are_no_hints():
    for empty in ([], (), np.empty((0, 3)), np.array([])):
        assert len(build_request(PIXELS, hints=empty).hints) == 0


@pytest.mark.parametrize(("intrinsics", "says"), [
    ((500.0, 510.0, 320.0), r"intrinsics must be 4 numbers \(fx, fy, cx, cy\)"),
    ("500,510,320,240", "intrinsics must be 4 numbers"),
    (np.eye(3), "intrinsics must be 4 numbers"),
    ((500.0, "510", 320.0, 240.0), "intrinsics must be 4 numbers"),
    (500.0, "intrinsics must be 4 numbers"),
])
def test_intrinsics_of_the_wrong_shape_are_a_value_error(intrinsics, says):
    with pytest.raises(ValueError, match=says):
        build_request(PIXELS, intrinsics=intrinsics)


@pytest.mark.parametrize(("hints", "says"), [
    (np.zeros((3, 2)), r"Nx3 array .* \(3, 2\)"),
    (np.zeros(3), r"Nx3 array .* \(3,\)"),
    (np.zeros((2, 3, 1)), "Nx3 array"),
    (np.array([["a", "b", "c"]]), "Nx3 array"),
    ([(1.0, 2.0, 3.0), (1.0, 2.0)], r"hints\[1\] must be 3 numbers \(x, y, depth_m\)"),
    ([(1.0, 2.0, 3.0, 4.0)], r"hints\[0\] must be 3 numbers"),
    ([(1.0, 2.0, None)], r"hints\[0\] must be 3 numbers"),
    (["1,2,3"], r"hints\[0\] must be 3 numbers"),
    ((1.0, 2.0, 3.0), r"hints\[0\] must be 3 numbers"),  # one hint, not wrapped in a list
    ("1,2,3", "triples or an Nx3 array"),
    (5, "triples or an Nx3 array"),
])
def test_hints_of_the_wrong_shape_are_a_value_error(hints, says):
    with pytest.raises(ValueError, match=says):
        build_request(PIXELS, hints=hints)


def test_values_are_the_daemons_to_judge():
    """fx = 0, a NaN hint, a hint outside the image: shapes are right, so they go as they are."""
    request = build_request(PIXELS, intrinsics=(0, 0, -1, -1), hints=[(-5, 1e9, float("nan")), (1, 1, -2)])
    assert request.intrinsics.fx == 0 and len(request.hints) == 2 and np.isnan(request.hints[0].depth_m)


def test_a_stream_sends_its_options_with_every_frame_and_a_frame_its_own_camera_and_hints():
    requests = StreamRequests({"intrinsics": K, "stabilize": True, "point_cloud": True, "point_stride": 2,
                               "point_cloud_rgb": True, "vis_min": 1.0, "vis_max": 5.0}, latest_frame_wins=False)
    other = CameraIntrinsics(100.0, 100.0, 2.0, 3.0)
    plain, hinted, moved = (requests.request(item) for item in (
        FRAME, StreamFrame(FRAME, hints=np.array(HINTS)), StreamFrame(FRAME, intrinsics=other, hints=HINTS[:1]),
    ))
    for request in (plain, hinted, moved):
        assert request.stabilize
        assert (request.output.point_cloud, request.output.point_stride, request.output.point_cloud_rgb) == (True, 2, True)
        assert (request.output.vis_min, request.output.vis_max) == (1.0, 5.0)
    assert [r.frame_id for r in (plain, hinted, moved)] == [0, 1, 2]
    assert plain.intrinsics.fx == hinted.intrinsics.fx == K[0] and moved.intrinsics.fx == 100.0
    assert [len(r.hints) for r in (plain, hinted, moved)] == [0, 3, 1]
    assert [(h.x, h.y, h.depth_m) for h in hinted.hints] == HINTS


def test_a_stream_checks_its_camera_before_it_opens_and_takes_hints_only_per_frame():
    with DepthClient("127.0.0.1:1") as client:
        with pytest.raises(ValueError, match="intrinsics must be 4 numbers"):
            client.stream([FRAME], intrinsics=(1.0, 2.0))
        with pytest.raises(TypeError, match="'hints'; a stream's frame carries it in its StreamFrame"):
            client.stream([FRAME], hints=HINTS)  # type: ignore[call-arg]


def test_estimate_refuses_stabilize_which_needs_a_stream_but_build_request_keeps_it():
    with DepthClient("127.0.0.1:1") as client, pytest.raises(ValueError, match=r"estimate\(\): stabilize .* stream\(\)"):
        client.estimate(FRAME, stabilize=True)

    async def main() -> None:
        async with AsyncDepthClient("127.0.0.1:1") as client:
            with pytest.raises(ValueError, match="stabilize"):
                await client.estimate(FRAME, stabilize=True)

    asyncio.run(main())
    assert build_request(FRAME, stabilize=True).stabilize


# --- responses -------------------------------------------------------------------------------------


def cloud(height: int, width: int, *, nan_at: tuple[int, int] | None = (0, 1)) -> np.ndarray:
    points = np.arange(height * width * 3, dtype=np.float32).reshape(height, width, 3) / 8 + 0.125
    if nan_at is not None:
        points[nan_at] = np.nan
    return points


def colours(height: int, width: int) -> np.ndarray:
    return (np.arange(height * width * 3) % 251).astype(np.uint8).reshape(height, width, 3)


def test_a_response_with_points_camera_and_alignment_becomes_a_result():
    points, rgb = cloud(2, 3), colours(2, 3)
    response = pb.EstimateResponse(
        frame_id=4, model="rel",
        depth=pb.DepthMap(width=3, height=2, data=np.ones((2, 3), "<f4").tobytes(), kind=pb.DEPTH_KIND_METRIC),
        intrinsics=pb.CameraIntrinsics(fx=250.0, fy=255.0, cx=1.0, cy=0.5),
        points=pb.PointCloud(width=3, height=2, xyz=points.astype("<f4").tobytes(), rgb=rgb.tobytes()),
        alignment=pb.Alignment(scale=2.5, shift=-0.25, hints_used=17, hints_rejected=3, rmse_m=0.125),
    )
    result = to_result(response)
    assert result.kind == "metric"
    assert result.intrinsics == CameraIntrinsics(250.0, 255.0, 1.0, 0.5)
    assert result.alignment == Alignment(2.5, -0.25, 17, 3, 0.125)
    assert result.points.shape == (2, 3, 3) and result.points.dtype == np.float32
    assert result.points.dtype.isnative and result.points.flags.writeable
    np.testing.assert_array_equal(result.points, points)  # NaN where NaN was sent
    assert np.isnan(result.points[0, 1]).all() and np.isfinite(result.points[1]).all()
    assert result.points_rgb.shape == (2, 3, 3) and result.points_rgb.dtype == np.uint8
    np.testing.assert_array_equal(result.points_rgb, rgb)


def test_a_strided_cloud_keeps_its_own_shape_and_comes_without_colour_unless_asked():
    result = to_result(pb.EstimateResponse(points=pb.PointCloud(width=2, height=5, xyz=cloud(5, 2).tobytes())))
    assert result.points.shape == (5, 2, 3) and result.points_rgb is None


def test_a_response_without_geometry_has_none():
    result = to_result(pb.EstimateResponse(depth=pb.DepthMap(width=1, height=1, data=b"\0\0\0\0")))
    assert (result.points, result.points_rgb, result.intrinsics, result.alignment) == (None, None, None, None)


def test_a_fit_that_did_not_happen_is_still_reported():
    """Fewer than 3 usable hints: no fit, and the alignment says how many were used (none, here)."""
    result = to_result(pb.EstimateResponse(alignment=pb.Alignment(hints_used=0, hints_rejected=2)))
    assert result.alignment == Alignment(0.0, 0.0, 0, 2, 0.0)


# --- PLY -------------------------------------------------------------------------------------------


def test_a_ply_parses_back_without_its_nan_points(tmp_path):
    points = cloud(3, 4, nan_at=(1, 2))
    points[2, 0, 2] = np.nan  # one coordinate is enough to make a point invalid
    path = tmp_path / "frame.ply"
    assert files.write_ply(path, points) == 10
    header, vertices = read_ply(path)
    assert header["format"] == "binary_little_endian 1.0"
    assert (header["element"], header["count"]) == ("vertex", 10)
    assert header["properties"] == [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    keep = np.isfinite(points).all(axis=2)
    np.testing.assert_array_equal(np.stack([vertices["x"], vertices["y"], vertices["z"]], axis=1), points[keep])


def test_a_ply_with_colour_keeps_each_points_own(tmp_path):
    points, rgb = cloud(2, 3), colours(2, 3)
    path = tmp_path / "frame.ply"
    assert files.write_ply(path, points, rgb) == 5
    header, vertices = read_ply(path)
    assert header["properties"] == [("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                    ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    keep = np.isfinite(points).all(axis=2)
    np.testing.assert_array_equal(np.stack([vertices["red"], vertices["green"], vertices["blue"]], axis=1), rgb[keep])
    np.testing.assert_array_equal(vertices["z"], points[keep][:, 2])


def test_a_ply_of_no_valid_points_is_still_a_ply(tmp_path):
    path = tmp_path / "empty.ply"
    assert files.write_ply(path, np.full((2, 2, 3), np.nan, dtype=np.float32)) == 0
    header, vertices = read_ply(path)
    assert header["count"] == 0 and len(vertices) == 0


def test_the_ply_format_asks_for_points_and_has_its_suffix(tmp_path):
    assert files.request_options("ply", metric=False) == {"point_cloud": True}
    assert files.output_path("a/frame.0001", tmp_path, "ply") == tmp_path / "a" / "frame.0001.ply"
    result = to_result(pb.EstimateResponse(depth=pb.DepthMap(width=1, height=1, data=b"\0\0\0\0")))
    with pytest.raises(ValueError, match="no point cloud"):
        files.write(result, tmp_path / "x.ply", "ply")


def test_a_metric_float_map_becomes_millimetres_in_png16():
    """A relative model's map made metric by hints comes as float32 metres: png16 holds millimetres."""
    depth = np.array([[0.5, 1.25], [np.nan, 70.0]], dtype=np.float32)
    result = DepthResult(0, 0, "m", depth, "metric", 0.5, 70.0, None)
    np.testing.assert_array_equal(files.as_uint16(result), [[500, 1250], [0, 65535]])


# --- the hints CSV ---------------------------------------------------------------------------------


def test_a_hints_csv_with_a_header_and_blank_lines(tmp_path):
    path = tmp_path / "hints.csv"
    path.write_text("\ufeffx, y, depth_m\n\n10,20,1.5\r\n 30.5 , 40, 2.25\n\n50,60,3\n")
    np.testing.assert_array_equal(files.read_hints(path), HINTS)
    bare = tmp_path / "bare.csv"
    bare.write_text("10,20,1.5\n30.5,40,2.25\n50,60,3")
    np.testing.assert_array_equal(files.read_hints(bare), HINTS)
    empty = tmp_path / "empty.csv"
    empty.write_text("x,y,depth_m\n")
    assert files.read_hints(empty).shape == (0, 3)


@pytest.mark.parametrize(("text", "line"), [
    ("x,y,depth_m\n10,20,1.5\n\n30,40\n", 4),
    ("10,20,1.5\n10,20,1.5,7\n", 2),
    ("10,20,far\n", 1),  # a number in it: not a header
    ("x,y,depth_m\nx,y,depth_m\n", 2),  # only the first line may be a header
    ("\n10,20,1.5\n10;20;1.5\n", 3),
])
def test_a_malformed_hints_line_names_the_file_and_line(tmp_path, text, line):
    path = tmp_path / "hints.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"hints\.csv:{line}: expected x,y,depth_m"):
        files.read_hints(path)


# --- over gRPC: a fake daemon that answers with geometry, for the clients and depthctl -------------


class GeometryEstimator(depth_pb2_grpc.DepthEstimatorServicer):
    """Records every request, and answers with a 2x3 metric map, the request's camera, an alignment that
    counts its hints, and a 2x3 cloud (one NaN point) with colours when asked for them."""

    def __init__(self) -> None:
        self.requests: list[pb.EstimateRequest] = []
        self._lock = threading.Lock()

    def Estimate(self, request: pb.EstimateRequest, context) -> pb.EstimateResponse:
        with self._lock:
            self.requests.append(request)
        response = pb.EstimateResponse(
            frame_id=request.frame_id, timestamp_ns=request.timestamp_ns, model="fake",
            depth=pb.DepthMap(width=3, height=2, data=np.full((2, 3), 2.0, "<f4").tobytes(), kind=pb.DEPTH_KIND_METRIC,
                              min=2.0, max=2.0),
            timing=pb.Timing(total_ms=1.0, batch_size=1),
        )
        if request.HasField("intrinsics"):
            response.intrinsics.CopyFrom(request.intrinsics)
        if request.hints:
            response.alignment.CopyFrom(pb.Alignment(scale=1.0, hints_used=len(request.hints)))
        if request.output.point_cloud:
            rgb = colours(2, 3).tobytes() if request.output.point_cloud_rgb else b""
            response.points.CopyFrom(pb.PointCloud(width=3, height=2, xyz=cloud(2, 3).astype("<f4").tobytes(), rgb=rgb))
        return response

    def EstimateStream(self, request_iterator, context):
        for request in request_iterator:
            yield self.Estimate(request, context)

    def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[pb.ModelInfo(name="fake", is_default=True, ready=True,
                                                          kind=pb.DEPTH_KIND_RELATIVE_DISPARITY)])


@pytest.fixture
def serve() -> Iterator:
    """`serve(servicer)` starts it on 127.0.0.1:0 and returns the address; stopped after the test."""
    started: list[grpc.Server] = []

    def start(servicer: depth_pb2_grpc.DepthEstimatorServicer) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        depth_pb2_grpc.add_DepthEstimatorServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in started:
        server.stop(None)


@pytest.fixture
def fake(serve) -> tuple[str, GeometryEstimator]:
    estimator = GeometryEstimator()
    return serve(estimator), estimator


def test_the_sync_and_async_clients_send_and_get_the_same_geometry(fake):
    address, estimator = fake
    frames = [FRAME, StreamFrame(FRAME, hints=HINTS), StreamFrame(FRAME, intrinsics=(1, 2, 3, 4), hints=np.array(HINTS[:2]))]
    options = {"intrinsics": K, "point_cloud": True, "point_cloud_rgb": True, "point_stride": 3, "stabilize": True}

    with DepthClient(address, timeout=10) as client:
        single = client.estimate(FRAME, intrinsics=CameraIntrinsics(*K), hints=HINTS, point_cloud=True)
        streamed = list(client.stream(frames, **options))

    async def main() -> tuple[DepthResult, list[DepthResult]]:
        async with AsyncDepthClient(address, timeout=10) as client:
            one = await client.estimate(FRAME, intrinsics=CameraIntrinsics(*K), hints=HINTS, point_cloud=True)
            return one, [r async for r in client.stream(frames, **options)]

    async_single, async_streamed = asyncio.run(main())
    for request in estimator.requests:
        request.ClearField("timestamp_ns")  # the time each frame was sent
    sync_requests, async_requests = estimator.requests[:4], estimator.requests[4:]
    assert sync_requests == async_requests

    assert single.intrinsics == CameraIntrinsics(*K) and single.alignment.hints_used == 3
    assert single.points.shape == (2, 3, 3) and single.points_rgb is None and np.isnan(single.points[0, 1]).all()
    assert [r.intrinsics for r in streamed] == [CameraIntrinsics(*K)] * 2 + [CameraIntrinsics(1, 2, 3, 4)]
    assert [r.alignment and r.alignment.hints_used for r in streamed] == [None, 3, 2]
    assert all(r.points_rgb is not None for r in streamed)
    assert all(r.stabilize and r.output.point_stride == 3 for r in sync_requests[1:])
    for mine, theirs in zip([single, *streamed], [async_single, *async_streamed]):
        assert (mine.intrinsics, mine.alignment, mine.frame_id) == (theirs.intrinsics, theirs.alignment, theirs.frame_id)
        np.testing.assert_array_equal(mine.points, theirs.points)


def test_a_frame_with_bad_hints_ends_the_stream_after_the_frames_before_it(fake):
    address, _ = fake
    with DepthClient(address, timeout=10) as client:
        results = client.stream([FRAME, StreamFrame(FRAME, hints=[(1.0, 2.0)]), FRAME])
        assert next(results).frame_id == 0
        with pytest.raises(ValueError, match=r"hints\[0\] must be 3 numbers"):
            next(results)


def images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"frame{index}.png" for index in range(count)]
    for path in paths:
        path.write_bytes(FRAME)
    return paths


def test_depthctl_estimate_writes_a_ply_per_image_with_the_camera_and_hints_it_was_given(fake, tmp_path, capsys):
    address, estimator = fake
    hints = tmp_path / "hints.csv"
    hints.write_text("x,y,depth_m\n10,20,1.5\n30.5,40,2.25\n50,60,3\n")
    paths = images(tmp_path / "in", 2)
    out = tmp_path / "out"
    argv = ["--target", address, "estimate", *map(str, paths), "-o", str(out), "--format", "ply",
            "--intrinsics", "500,510,320.5,240.25", "--hints", str(hints), "--rgb", "--point-stride", "2"]
    assert depthctl(argv) == 0
    assert "hints 3 used 0 rejected" in capsys.readouterr().out
    for request in estimator.requests:
        assert (request.intrinsics.fx, request.intrinsics.fy, request.intrinsics.cx, request.intrinsics.cy) == K
        assert [(h.x, h.y, h.depth_m) for h in request.hints] == HINTS
        assert (request.output.point_cloud, request.output.point_cloud_rgb, request.output.point_stride) == (True, True, 2)
        assert not request.stabilize
    assert len(estimator.requests) == 2
    for path in paths:
        header, vertices = read_ply(out / f"{path.stem}.ply")
        assert header["count"] == 5 and [name for name, _ in header["properties"]][3:] == ["red", "green", "blue"]
        np.testing.assert_array_equal(vertices["x"], cloud(2, 3)[np.isfinite(cloud(2, 3)).all(axis=2)][:, 0])


def test_depthctl_stream_writes_plys_stabilized_with_hints_on_every_frame(fake, tmp_path):
    address, estimator = fake
    hints = tmp_path / "hints.csv"
    hints.write_text("10,20,1.5\n30.5,40,2.25\n50,60,3\n")
    paths = images(tmp_path / "in", 3)
    out = tmp_path / "out"
    argv = ["--target", address, "stream", str(tmp_path / "in"), "-o", str(out), "--format", "ply",
            "--stabilize", "--hints", str(hints), "--intrinsics", "500,510,320.5,240.25"]
    assert depthctl(argv) == 0
    assert [r.frame_id for r in estimator.requests] == [0, 1, 2]
    for request in estimator.requests:
        assert request.stabilize and len(request.hints) == 3 and request.intrinsics.fx == K[0]
        assert request.output.point_cloud and not request.output.point_cloud_rgb
    for path in paths:
        header, _ = read_ply(out / f"{path.stem}.ply")
        assert header["count"] == 5 and len(header["properties"]) == 3


def test_depthctl_png16_of_a_hinted_map_holds_millimetres(fake, tmp_path):
    address, _ = fake
    hints = tmp_path / "hints.csv"
    hints.write_text("10,20,1.5\n30.5,40,2.25\n50,60,3\n")
    [path] = images(tmp_path / "in", 1)
    assert depthctl(["--target", address, "estimate", str(path), "-o", str(tmp_path), "--format", "png16",
                     "--hints", str(hints)]) == 0
    with Image.open(tmp_path / "frame0.depth16.png") as png:
        np.testing.assert_array_equal(np.asarray(png), np.full((2, 3), 2000))  # the fake's 2 m, not stretched


class PointlessEstimator(GeometryEstimator):
    """A daemon from before point clouds: a map, and nothing of what was asked for."""

    def Estimate(self, request: pb.EstimateRequest, context) -> pb.EstimateResponse:
        return pb.EstimateResponse(depth=pb.DepthMap(width=1, height=1, data=b"\0\0\0\0"), timing=pb.Timing(total_ms=1.0))


def test_depthctl_refuses_a_ply_the_daemon_sent_no_points_for(serve, tmp_path, capsys):
    """A clear error, exit 1, rather than an empty file."""
    address = serve(PointlessEstimator())
    [path] = images(tmp_path / "in", 1)
    assert depthctl(["--target", address, "estimate", str(path), "-o", str(tmp_path), "--format", "ply"]) == 1
    assert "no point cloud" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "says"), [
    (["estimate", "x.png", "--stabilize"], "unrecognized arguments: --stabilize"),
    (["estimate", "x.png", "--rgb"], "--rgb goes with --format ply"),
    (["stream", "dir", "--point-stride", "4", "--format", "vis"], "--point-stride goes with --format ply"),
    (["estimate", "x.png", "--format", "ply", "--point-stride", "-1"], "argument --point-stride: expected a whole number"),
    (["estimate", "x.png", "--intrinsics", "500,510,320"], r"argument --intrinsics: expected fx,fy,cx,cy \(4 numbers\)"),
    (["stream", "dir", "--intrinsics", "a,b,c,d"], "argument --intrinsics: expected fx,fy,cx,cy"),
    (["stream", "dir", "--vis-range", "1"], r"argument --vis-range: expected MIN,MAX \(2 numbers\)"),
    (["estimate", "x.png", "--hints", "/nonexistent/hints.csv"], "argument --hints: .*No such file"),
])
def test_depthctl_checks_its_flags_and_exits_2(argv, says, capsys):
    with pytest.raises(SystemExit) as exited:
        depthctl(["--target", "127.0.0.1:1", *argv])
    assert exited.value.code == 2
    assert re.search(says, capsys.readouterr().err)


def test_depthctl_names_the_malformed_line_of_a_hints_file(tmp_path, capsys):
    hints = tmp_path / "lidar.csv"
    hints.write_text("x,y,depth_m\n1,2,3\n4,5\n")
    for command in (["estimate", "x.png"], ["stream", str(tmp_path)]):
        with pytest.raises(SystemExit) as exited:
            depthctl(["--target", "127.0.0.1:1", *command, "--hints", str(hints)])
        assert exited.value.code == 2
        assert f"{hints}:3: expected x,y,depth_m" in capsys.readouterr().err
