"""Depth a robot can act on: intrinsics, point clouds, metric scale from a few true depths, and
streams that do not flicker.

The maths is checked where it is exact (the engine's geometry on known surfaces), and the
plumbing through a real daemon, whose models' forward passes are replaced by functions with
known outputs where a test needs to know the truth: a random network's map means nothing.
"""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
import torch
from daemon import DaemonThread
from scenes import scene
from transformers.modeling_outputs import DepthEstimatorOutput

from depthd.config import Limits, ModelSettings, Settings
from depthd.domain import Alignment, DepthKind, Hint, Intrinsics
from depthd.engine.geometry import Stabilizer, back_project, fit_to_hints
from depthd_client.v1 import depth_pb2 as pb
from depthd_client.v1 import depth_pb2_grpc

SMALL = ((48, 64),)
K = Intrinsics(fx=500.0, fy=480.0, cx=310.5, cy=242.0)


def tilted_plane(height: int, width: int, k: Intrinsics, normal=(0.2, -0.3, 1.0), distance=3.0) -> np.ndarray:
    """Depth (z) of the plane n . X = d seen through camera k, per pixel."""
    n = np.array(normal) / np.linalg.norm(normal)
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    rays = np.stack([(u - k.cx) / k.fx, (v - k.cy) / k.fy, np.ones_like(u)], -1)
    return distance / (rays @ n)


# --- the engine's geometry, where it is exact ----------------------------------------------


def test_a_tilted_plane_back_projects_onto_itself():
    normal, distance = np.array([0.2, -0.3, 1.0]), 3.0
    depth = tilted_plane(480, 640, K, normal, distance)
    points = back_project(torch.from_numpy(depth).float(), K, stride=1).double().numpy()
    on_plane = points @ (normal / np.linalg.norm(normal)) - distance
    assert points.shape == (480, 640, 3)
    assert np.abs(on_plane).max() < 1e-5 * distance
    np.testing.assert_allclose(points[..., 2], depth, rtol=1e-6)
    # the optical frame: right of the principal point is +x, below it +y
    assert points[242, 600, 0] > 0 and points[470, 310, 1] > 0

    strided = back_project(torch.from_numpy(depth).float(), K, stride=7).numpy()
    assert strided.shape == (math.ceil(480 / 7), math.ceil(640 / 7), 3)
    np.testing.assert_allclose(strided, points[::7, ::7], rtol=1e-5)


def test_points_without_a_valid_depth_are_nan():
    depth = torch.full((4, 5), 2.0)
    depth[0, 0], depth[1, 1], depth[2, 2] = float("nan"), 0.0, -1.0
    points = back_project(depth, K, stride=1).numpy()
    invalid = np.isnan(points).all(-1)
    assert invalid.sum() == 3 and invalid[0, 0] and invalid[1, 1] and invalid[2, 2]
    assert np.isfinite(points[~invalid]).all()


def test_intrinsics_follow_the_map_when_it_is_resized():
    half = K.scaled((480, 640), (240, 320))
    assert (half.fx, half.fy) == (250.0, 240.0)
    # pixel centres at whole coordinates: the centre of pixel 310.5 lands on 155
    assert half.cx == pytest.approx(155.0) and half.cy == pytest.approx(120.75)


def _truth(height=96, width=128) -> np.ndarray:
    """A smooth scene 1.5 to 6 m deep: a floor rising to a wall, and a box."""
    v, u = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    depth = 6.0 - 4.0 * np.clip(v - 0.3, 0, 1) / 0.7
    depth[20:50, 30:60] = 2.2
    return depth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_relative_disparity_map_is_made_metric_by_twenty_hints_three_of_them_wrong(seed):
    rng = np.random.default_rng(seed)
    truth = _truth()
    a, b = rng.uniform(0.5, 5.0), rng.uniform(-0.2, 0.3)
    disparity = torch.from_numpy(a / truth + b).float()
    ys, xs = rng.integers(0, truth.shape[0], 20), rng.integers(0, truth.shape[1], 20)
    measured = truth[ys, xs].copy()
    measured[:3] *= np.array([2.5, 0.3, 1.8])  # three outliers: a reflection, a glint, a mismatch
    hints = tuple(Hint(float(x), float(y), float(d)) for x, y, d in zip(xs, ys, measured))

    fitted = fit_to_hints(disparity, DepthKind.RELATIVE_DISPARITY, hints, truth.shape)

    relative_error = np.abs(fitted.depth.numpy() - truth) / truth
    assert np.median(relative_error) < 0.01
    assert (fitted.alignment.hints_used, fitted.alignment.hints_rejected) == (17, 3)
    assert fitted.alignment.scale == pytest.approx(1 / a, rel=0.01)
    assert fitted.alignment.rmse_m < 0.05


def test_relative_depth_and_metric_maps_are_fitted_too():
    truth = _truth()
    hints = tuple(Hint(float(x), float(y), float(truth[y, x])) for y, x in [(5, 5), (60, 100), (30, 40), (90, 10), (70, 70)])
    depth_fit = fit_to_hints(torch.from_numpy((truth - 1.0) / 3.0).float(), DepthKind.RELATIVE_DEPTH, hints, truth.shape)
    np.testing.assert_allclose(depth_fit.depth.numpy(), truth, rtol=1e-4)
    assert (depth_fit.alignment.scale, depth_fit.alignment.shift) == pytest.approx((3.0, 1.0), rel=1e-4)
    metric_fit = fit_to_hints(torch.from_numpy(truth * 0.8).float(), DepthKind.METRIC, hints, truth.shape)
    np.testing.assert_allclose(metric_fit.depth.numpy(), truth, rtol=1e-4)
    assert metric_fit.alignment.scale == pytest.approx(1.25, rel=1e-4) and metric_fit.alignment.shift == 0


def test_bad_hints_are_rejected_and_counted_and_too_few_leave_the_map_as_it_was():
    truth = _truth()
    disparity = torch.from_numpy(1 / truth).float()
    bad = (Hint(float("nan"), 3, 2.0), Hint(5, 5, -1.0), Hint(5, 5, 0.0), Hint(500, 5, 2.0), Hint(5, 5, float("inf")))
    good = (Hint(10, 10, float(truth[10, 10])), Hint(100, 70, float(truth[70, 100])))
    fitted = fit_to_hints(disparity, DepthKind.RELATIVE_DISPARITY, bad + good, truth.shape)
    assert fitted.alignment == Alignment(0.0, 0.0, 2, 5, 0.0) and not fitted.alignment.applied
    assert torch.equal(fitted.depth, disparity)


def test_the_stabilizer_removes_a_frame_s_scale_and_shift_and_restarts_on_a_cut():
    rng = np.random.default_rng(3)
    base = torch.from_numpy(_truth()).float()
    stabilizer = Stabilizer()
    first = stabilizer(base.clone())
    assert torch.equal(first, base), "the first frame is as the model gave it"
    for _ in range(5):
        scale, shift = rng.uniform(0.6, 1.4), rng.uniform(-1, 1)
        aligned = stabilizer(base * scale + shift)
        np.testing.assert_allclose(aligned.numpy(), base.numpy(), rtol=1e-3, atol=1e-3)
    other = torch.from_numpy(np.random.default_rng(9).uniform(1, 9, base.shape)).float()  # another scene
    assert torch.equal(stabilizer(other), other), "a scene cut starts a new reference"


# --- through the daemon -------------------------------------------------------------------


def replace_forward(model, depth_of):
    """The model's forward pass becomes `depth_of(pixel_values)` -> (B, h, w) depth."""
    model.forward = lambda pixel_values, **_: DepthEstimatorOutput(predicted_depth=depth_of(pixel_values))


@pytest.fixture(scope="module")
def daemon(tiny_models):
    settings = Settings(
        listen=("127.0.0.1:0",),
        models=(
            ModelSettings("metric", str(tiny_models["depth_anything_metric"]), warmup_sizes=SMALL),
            ModelSettings("camera", str(tiny_models["depth_anything_metric"]), warmup_sizes=SMALL,
                          intrinsics=Intrinsics(100.0, 100.0, 31.5, 23.5)),
            ModelSettings("relative", str(tiny_models["depth_anything"]), warmup_sizes=SMALL),
            ModelSettings("smooth", str(tiny_models["depth_anything"]), warmup_sizes=SMALL),
            ModelSettings("pro", str(tiny_models["depth_pro"]), warmup_sizes=((64, 64),)),
        ),
        limits=Limits(max_message_bytes=4 * 1024 * 1024),
    )
    running = DaemonThread(settings)
    from daemon import wait_for

    wait_for(lambda: running.daemon.pool.ready, "the models to load", 120)
    pool = running.daemon.pool
    # two metres everywhere but a band of nothing on the left: a wall facing the camera
    replace_forward(pool.engine("metric").checkpoint.model, lambda x: wall(x.shape))
    replace_forward(pool.engine("camera").checkpoint.model, lambda x: wall(x.shape))
    # an image's brightness, blurred: a "relative disparity" that moves with exposure as a scale and
    # a shift, as a trained model's does (a random network's map does not: it flickers for nothing)
    replace_forward(pool.engine("smooth").checkpoint.model,
                    lambda x: torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), 9, 1, 4)[:, 0] + 3.0)
    yield running
    assert running.stop() == 0


def wall(shape) -> torch.Tensor:
    depth = torch.full((shape[0], shape[2], shape[3]), 2.0)
    depth[..., : shape[3] // 4] = 0.0
    return depth


def call(daemon, request: pb.EstimateRequest) -> pb.EstimateResponse:
    with grpc.insecure_channel(daemon.address) as channel:
        return depth_pb2_grpc.DepthEstimatorStub(channel).Estimate(request, timeout=60)


def refusal(daemon, request: pb.EstimateRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(daemon, request)
    return caught.value


def frame(width=64, height=48, seed=0, **fields) -> pb.EstimateRequest:
    image = pb.Image(raw=pb.RawImage(width=width, height=height, format=pb.PIXEL_FORMAT_RGB8,
                                     data=scene(width, height, seed=seed).tobytes()))
    return pb.EstimateRequest(image=image, **fields)


def xyz(response: pb.EstimateResponse) -> np.ndarray:
    cloud = response.points
    return np.frombuffer(cloud.xyz, "<f4").reshape(cloud.height, cloud.width, 3)


def test_a_point_cloud_of_a_wall_two_metres_away(daemon):
    k = pb.CameraIntrinsics(fx=100, fy=110, cx=31.5, cy=23.5)
    reply = call(daemon, frame(model="metric", intrinsics=k,
                               output=pb.OutputOptions(point_cloud=True, point_cloud_rgb=True)))
    points = xyz(reply)
    assert (reply.points.width, reply.points.height) == (64, 48)
    assert (reply.intrinsics.fx, reply.intrinsics.cx) == (100, 31.5)
    right = points[:, 24:]
    np.testing.assert_allclose(right[..., 2], 2.0, rtol=1e-5)
    v, u = np.mgrid[0:48, 24:64]
    np.testing.assert_allclose(right[..., 0], (u - 31.5) * 2.0 / 100, atol=1e-4)
    np.testing.assert_allclose(right[..., 1], (v - 23.5) * 2.0 / 110, atol=1e-4)
    assert np.isnan(points[:, :10]).all(), "no depth, no point"
    rgb = np.frombuffer(reply.points.rgb, np.uint8).reshape(48, 64, 3)
    np.testing.assert_array_equal(rgb, scene(64, 48))


def test_intrinsics_are_scaled_to_the_map_and_a_stride_thins_the_cloud(daemon):
    k = pb.CameraIntrinsics(fx=100, fy=100, cx=31.5, cy=23.5)
    reply = call(daemon, frame(model="metric", intrinsics=k,
                               output=pb.OutputOptions(width=32, point_cloud=True, point_stride=3)))
    assert (reply.depth.width, reply.depth.height) == (32, 24)
    assert (reply.intrinsics.fx, reply.intrinsics.fy) == (50, 50)
    assert (reply.intrinsics.cx, reply.intrinsics.cy) == (pytest.approx(15.5), pytest.approx(11.5))
    assert (reply.points.width, reply.points.height) == (11, 8)
    points = xyz(reply)
    np.testing.assert_allclose(points[4, 8], [(24 - 15.5) * 2 / 50, (12 - 11.5) * 2 / 50, 2.0], rtol=1e-4)


def test_the_models_configured_camera_and_depth_pros_own_focal_length(daemon):
    configured = call(daemon, frame(model="camera", output=pb.OutputOptions(point_cloud=True)))
    assert (configured.intrinsics.fx, configured.intrinsics.cx) == (100, 31.5)
    asked = call(daemon, frame(model="camera", intrinsics=pb.CameraIntrinsics(fx=80, fy=80, cx=30, cy=20),
                               output=pb.OutputOptions(point_cloud=True)))
    assert asked.intrinsics.fx == 80, "the request's intrinsics come first"
    pro = call(daemon, frame(model="pro", output=pb.OutputOptions(point_cloud=True)))
    focal = 0.5 * 64 / math.tan(math.radians(pro.field_of_view_deg) / 2)
    assert pro.intrinsics.fx == pytest.approx(focal, rel=1e-4) == pytest.approx(pro.intrinsics.fy, rel=1e-4)
    assert (pro.intrinsics.cx, pro.intrinsics.cy) == (31.5, 23.5)
    assert pro.points.width == 64 and np.isfinite(xyz(pro)).any()


def test_hints_make_a_relative_model_metric_through_the_daemon(daemon):
    truth = _truth(48, 64)
    pool = daemon.daemon.pool
    a, b = 1.7, 0.05
    # the model answers the truth's disparity, at whatever size it is asked
    replace_forward(pool.engine("relative").checkpoint.model, lambda x: torch.nn.functional.interpolate(
        torch.from_numpy(a / truth + b).float()[None, None], size=x.shape[-2:], mode="bilinear")[:, 0].expand(x.shape[0], -1, -1))
    rng = np.random.default_rng(4)
    ys, xs = rng.integers(2, 46, 12), rng.integers(2, 62, 12)
    hints = [pb.DepthHint(x=float(x), y=float(y), depth_m=float(truth[y, x])) for x, y in zip(xs, ys)]
    hints += [pb.DepthHint(x=10, y=10, depth_m=float("nan")), pb.DepthHint(x=-40, y=10, depth_m=2.0)]
    reply = call(daemon, frame(model="relative", hints=hints, intrinsics=pb.CameraIntrinsics(fx=60, fy=60, cx=31.5, cy=23.5),
                               output=pb.OutputOptions(point_cloud=True, encoding=pb.DEPTH_ENCODING_UINT16_MM)))
    assert reply.depth.kind == pb.DEPTH_KIND_METRIC
    assert (reply.alignment.hints_used, reply.alignment.hints_rejected) == (12, 2)
    metres = np.frombuffer(reply.depth.data, "<u2").reshape(48, 64) / 1000.0
    assert np.median(np.abs(metres - truth) / truth) < 0.01
    assert np.nanmedian(np.abs(xyz(reply)[..., 2] - truth) / truth) < 0.01

    too_few = call(daemon, frame(model="relative", hints=hints[:2]))
    assert too_few.depth.kind == pb.DEPTH_KIND_RELATIVE_DISPARITY and too_few.alignment.hints_used == 2


@pytest.mark.parametrize(
    "request_, code, message",
    [
        (frame(model="metric", intrinsics=pb.CameraIntrinsics(fx=0, fy=100, cx=30, cy=20)),
         grpc.StatusCode.INVALID_ARGUMENT, "intrinsics.fx: must be a positive number of pixels"),
        (frame(model="relative", intrinsics=pb.CameraIntrinsics(fx=100, fy=100, cx=30, cy=20),
               output=pb.OutputOptions(point_cloud=True)),
         grpc.StatusCode.INVALID_ARGUMENT, "send at least 3 hints"),
        (frame(model="metric", output=pb.OutputOptions(point_cloud=True)),
         grpc.StatusCode.INVALID_ARGUMENT, "no camera intrinsics: set EstimateRequest.intrinsics"),
        (frame(model="camera", output=pb.OutputOptions(point_cloud=True, point_stride=100)),
         grpc.StatusCode.INVALID_ARGUMENT, "output.point_stride: 100 is larger than the 64x48 map"),
        (frame(model="camera", stabilize=True), grpc.StatusCode.INVALID_ARGUMENT, "stabilize: for a stream's frames"),
        (frame(width=1024, height=768, model="camera", output=pb.OutputOptions(point_cloud=True, point_cloud_rgb=True)),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "output.point_stride: a 1024x768 point cloud (stride 1)"),
    ],
    ids=["fx-zero", "relative-without-hints", "no-intrinsics", "stride-too-large", "stabilize-unary", "too-large"],
)
def test_bad_geometry_gets_a_clear_status(daemon, request_, code, message):
    error = refusal(daemon, request_)
    assert error.code() is code and message in error.details(), error.details()


def test_in_a_stream_bad_geometry_fails_its_frame_and_the_stream_goes_on(daemon):
    k = pb.CameraIntrinsics(fx=100, fy=100, cx=31.5, cy=23.5)
    requests = [
        frame(model="camera", frame_id=1, output=pb.OutputOptions(point_cloud=True)),
        frame(model="metric", frame_id=2, intrinsics=pb.CameraIntrinsics(fx=-5, fy=100, cx=30, cy=20)),
        frame(model="relative", frame_id=3, intrinsics=k, output=pb.OutputOptions(point_cloud=True)),
        frame(model="relative", frame_id=4, hints=[pb.DepthHint(x=1, y=1, depth_m=float("nan"))] * 5, intrinsics=k,
              output=pb.OutputOptions(encoding=pb.DEPTH_ENCODING_FLOAT16)),
        frame(model="camera", frame_id=5, output=pb.OutputOptions(point_cloud=True, point_stride=2)),
    ]
    with grpc.insecure_channel(daemon.address) as channel:
        replies = list(depth_pb2_grpc.DepthEstimatorStub(channel).EstimateStream(iter(requests), timeout=60))
    assert [r.frame_id for r in replies] == [1, 2, 3, 4, 5]
    assert [r.error.code for r in replies] == [0, 3, 3, 0, 0]
    assert replies[3].alignment.hints_rejected == 5 and replies[3].depth.kind == pb.DEPTH_KIND_RELATIVE_DISPARITY
    assert replies[4].points.width == 32


def test_depthctl_turns_a_photo_into_a_ply_of_the_wall(daemon, tmp_path, capsys):
    from PIL import Image
    from test_client_geometry import read_ply

    from depthd_client.cli import main as depthctl

    photo = tmp_path / "wall.png"
    Image.fromarray(scene(64, 48)).save(photo)
    argv = ["--target", daemon.address, "estimate", str(photo), "--model", "metric", "-o", str(tmp_path),
            "--format", "ply", "--intrinsics", "100,100,31.5,23.5", "--rgb"]
    assert depthctl(argv) == 0, capsys.readouterr().err
    header, points = read_ply(tmp_path / "wall.ply")
    assert 36 * 48 <= header["count"] < 64 * 48, "the band without depth is left out"
    np.testing.assert_allclose(points["z"], 2.0, rtol=1e-5)
    u = np.round(points["x"] * 100 / 2.0 + 31.5).astype(int)
    v = np.round(points["y"] * 100 / 2.0 + 23.5).astype(int)
    np.testing.assert_array_equal(np.stack([points["red"], points["green"], points["blue"]], 1), scene(64, 48)[v, u])


def flicker(maps: np.ndarray) -> float:
    """The per-pixel temporal standard deviation over the spatial standard deviation, averaged over the frame."""
    return float(maps.std(0).mean() / maps.mean(0).std())


def camera_frames(count: int, seed: int = 7) -> list[np.ndarray]:
    """One static scene, with what a camera does to it frame to frame: exposure (gain 0.7-1.3, a small
    shift) and sensor noise, kept away from saturation."""
    rng = np.random.default_rng(seed)
    base = scene(64, 48, seed=2).astype(np.float64) * 0.7 + 30
    return [np.clip(base * rng.uniform(0.7, 1.3) + rng.uniform(-8, 8) + rng.normal(0, 1.5, base.shape), 0, 255)
            .astype(np.uint8) for _ in range(count)]


def stream_maps(daemon, frames, stabilize: bool) -> np.ndarray:
    requests = [pb.EstimateRequest(model="smooth", stabilize=stabilize, frame_id=i, image=pb.Image(raw=pb.RawImage(
        width=64, height=48, format=pb.PIXEL_FORMAT_RGB8, data=f.tobytes()))) for i, f in enumerate(frames)]
    with grpc.insecure_channel(daemon.address) as channel:
        replies = list(depth_pb2_grpc.DepthEstimatorStub(channel).EstimateStream(iter(requests), timeout=60))
    return np.stack([np.frombuffer(r.depth.data, "<f4").reshape(48, 64) for r in replies])


def test_stabilize_takes_the_flicker_out_of_a_relative_stream(daemon):
    frames = camera_frames(24)
    plain, stable = stream_maps(daemon, frames, False), stream_maps(daemon, frames, True)
    # an exposure change moves the stand-in model's map by a scale and a shift (checked, not assumed)
    gains = [np.polyfit(plain[0].ravel(), m.ravel(), 1)[0] for m in plain[1:]]
    assert max(gains) / min(gains) > 1.3
    assert flicker(plain) / flicker(stable) >= 3, (flicker(plain), flicker(stable))
    np.testing.assert_array_equal(stable[0], plain[0])  # the first frame is as the model gave it
    alone = [call(daemon, pb.EstimateRequest(model="smooth", image=pb.Image(raw=pb.RawImage(
        width=64, height=48, format=pb.PIXEL_FORMAT_RGB8, data=f.tobytes())))) for f in frames[:3]]
    for reply, streamed in zip(alone, plain):
        np.testing.assert_array_equal(np.frombuffer(reply.depth.data, "<f4").reshape(48, 64), streamed)


def test_a_fixed_visualization_range_keeps_a_streams_colours(daemon):
    frames = camera_frames(2)
    requests = [pb.EstimateRequest(model="metric", image=pb.Image(raw=pb.RawImage(
        width=64, height=48, format=pb.PIXEL_FORMAT_RGB8, data=f.tobytes())), output=pb.OutputOptions(
        visualization=True, vis_min=0.0, vis_max=4.0)) for f in frames]
    with grpc.insecure_channel(daemon.address) as channel:
        first, _ = list(depth_pb2_grpc.DepthEstimatorStub(channel).EstimateStream(iter(requests), timeout=60))
    from io import BytesIO

    from PIL import Image

    picture = np.array(Image.open(BytesIO(first.visualization_png)))
    # 2 m of a 0..4 m range, near bright: the middle grey; no depth (0 m) is the nearest, white
    assert abs(int(picture[20, 40]) - 127) <= 1 and picture[20, 2] == 255
