"""The daemon end to end: a real server on a loopback port, talked to through the real client package."""

from __future__ import annotations

import io
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
from daemon import DaemonThread, GatedPool, wait_for
from PIL import Image
from scenes import scene

from depthd.config import Limits, ModelSettings, Settings
from depthd.domain import Frame, OutputSpec
from depthd.engine.engine import DepthEngine
from depthd_client import DepthClient, DepthdError, StreamFrame
from depthd_client.v1 import depth_pb2 as pb
from depthd_client.v1 import depth_pb2_grpc

LIMITS = Limits(max_message_bytes=4 * 1024 * 1024, max_input_pixels=1_000_000, max_output_side=1024, stream_window=2)


def settings_for(tiny_models, **model_overrides) -> Settings:
    return Settings(
        listen=("127.0.0.1:0",),
        models=(
            ModelSettings("rel", str(tiny_models["depth_anything"]), warmup_sizes=((64, 96),), **model_overrides),
            ModelSettings("metric", str(tiny_models["depth_anything_metric"]), warmup_sizes=((64, 96),)),
        ),
        limits=LIMITS,
    )


@pytest.fixture(scope="module")
def daemon(tiny_models):
    running = DaemonThread(settings_for(tiny_models))
    with DepthClient(running.address) as client:
        client.wait_until_serving(60)
    yield running
    assert running.stop() == 0


@pytest.fixture
def client(daemon):
    with DepthClient(daemon.address, timeout=30) as c:
        yield c


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_unary_raw_and_encoded_frames_give_the_engines_depth(client, tiny_models):
    pixels = scene(120, 90)
    raw = client.estimate(pixels, frame_id=7, timestamp_ns=123456789)
    encoded = client.estimate(png_bytes(pixels))
    engine = DepthEngine.load(ModelSettings("x", str(tiny_models["depth_anything"])))
    expected = engine.estimate([Frame(pixels)], [OutputSpec()])[0]

    assert (raw.frame_id, raw.timestamp_ns, raw.model) == (7, 123456789, "rel")
    assert raw.kind == "relative_disparity" and raw.depth.dtype == np.float32 and raw.depth.shape == (90, 120)
    np.testing.assert_allclose(raw.depth, expected.depth, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(encoded.depth, raw.depth, rtol=1e-5, atol=1e-6)
    assert raw.min == pytest.approx(float(raw.depth.min()), rel=1e-5)
    assert raw.timing.batch_size >= 1 and raw.timing.total_ms >= raw.timing.inference_ms > 0


def test_output_options_reach_the_map(client):
    pixels = scene(120, 90)
    as_float = client.estimate(pixels, model="metric")
    half = client.estimate(pixels, model="metric", encoding="float16", width=60)
    mm = client.estimate(pixels, model="metric", encoding="uint16_mm", visualization=True, colormap="turbo")

    assert as_float.kind == "metric"
    assert half.depth.dtype == np.float16 and half.depth.shape == (45, 60)
    assert mm.depth.dtype == np.uint16
    expected_mm = np.clip(np.round(as_float.depth * 1000), 0, 65535)  # 0: no value (bicubic undershoot below 0 m)
    assert np.abs(mm.depth.astype(np.int64) - expected_mm).max() <= 1
    vis = np.array(Image.open(io.BytesIO(mm.visualization_png)))
    assert vis.shape == (90, 120, 3) and vis.dtype == np.uint8


def _raw_request(width=64, height=48, fmt=pb.PIXEL_FORMAT_RGB8, data=None, **fields) -> pb.EstimateRequest:
    channels = 1 if fmt == pb.PIXEL_FORMAT_GRAY8 else 3
    data = bytes(width * height * channels) if data is None else data
    return pb.EstimateRequest(image=pb.Image(raw=pb.RawImage(width=width, height=height, format=fmt, data=data)), **fields)


def _bomb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (2000, 1000)).save(buffer, format="PNG")  # 2 MP of zeros: a few kB on the wire
    return buffer.getvalue()


@pytest.mark.parametrize(
    "request_, code, message",
    [
        (pb.EstimateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "image: required"),
        (pb.EstimateRequest(image=pb.Image(encoded=b"not an image")), grpc.StatusCode.INVALID_ARGUMENT, "image.encoded"),
        (_raw_request(data=b"\x00" * 100), grpc.StatusCode.INVALID_ARGUMENT, "image.raw.data: 100 bytes"),
        (_raw_request(fmt=pb.PIXEL_FORMAT_UNSPECIFIED), grpc.StatusCode.INVALID_ARGUMENT, "image.raw.format: must be set"),
        (_raw_request(output=pb.OutputOptions(width=5000)), grpc.StatusCode.INVALID_ARGUMENT,
         "output.width: 5000 is over the limit of 1024"),
        (_raw_request(output=pb.OutputOptions(encoding=pb.DEPTH_ENCODING_UINT16_MM)), grpc.StatusCode.INVALID_ARGUMENT,
         "output.encoding: UINT16_MM needs a metric model"),
        (_raw_request(model="nope"), grpc.StatusCode.NOT_FOUND, "model 'nope' is not served; served: rel, metric"),
        (_raw_request(width=1200, height=1000, fmt=pb.PIXEL_FORMAT_GRAY8), grpc.StatusCode.RESOURCE_EXHAUSTED,
         "over the limit of 1000000"),
        (pb.EstimateRequest(image=pb.Image(encoded=_bomb_png())), grpc.StatusCode.RESOURCE_EXHAUSTED,
         "2000x1000 is 2000000 pixels, over the limit of 1000000"),
        (_raw_request(width=2048, height=1024, data=bytes(2048 * 1024 * 3)), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    ],
    ids=["no-image", "bad-bytes", "raw-size", "raw-format", "output-size", "mm-relative", "unknown-model",
         "raw-pixels", "bomb", "message-size"],
)
def test_bad_requests_get_their_status_code(daemon, request_, code, message):
    with grpc.insecure_channel(daemon.address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            depth_pb2_grpc.DepthEstimatorStub(channel).Estimate(request_, timeout=30)
    assert caught.value.code() is code
    assert message in caught.value.details()


def test_the_client_raises_with_the_status_code(client):
    with pytest.raises(DepthdError) as caught:
        client.estimate(scene(64, 48), model="nope")
    assert caught.value.code is grpc.StatusCode.NOT_FOUND


def test_stream_answers_every_frame_in_order_and_survives_a_bad_one(client):
    frames = [
        StreamFrame(scene(96, 64, seed=1), frame_id=100, timestamp_ns=1),
        StreamFrame(png_bytes(scene(80, 80, seed=2)), frame_id=101, timestamp_ns=2),
        StreamFrame(b"garbage", frame_id=102, timestamp_ns=3),
        StreamFrame(scene(64, 96, seed=3), frame_id=103, timestamp_ns=4),
        StreamFrame(scene(96, 64, seed=4), frame_id=104, timestamp_ns=5),
    ]
    results = list(client.stream(frames))

    assert [(r.frame_id, r.timestamp_ns) for r in results] == [(100, 1), (101, 2), (102, 3), (103, 4), (104, 5)]
    assert [r.ok for r in results] == [True, True, False, True, True]
    assert results[2].error.code is grpc.StatusCode.INVALID_ARGUMENT and results[2].depth is None
    assert [r.depth.shape for r in results if r.ok] == [(64, 96), (80, 80), (96, 64), (64, 96)]
    alone = client.estimate(frames[3].image)
    np.testing.assert_allclose(results[3].depth, alone.depth, rtol=1e-4, atol=1e-5)


def test_health_service_and_reflection(daemon, client):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    assert client.health() == "SERVING"
    assert client.health("depthd.v1.DepthEstimator") == "SERVING"
    assert client.health("depthd.v1.DepthEstimator/metric") == "SERVING"
    assert client.health("depthd.v1.DepthEstimator/nope") == "SERVICE_UNKNOWN"
    with grpc.insecure_channel(daemon.address) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "depthd.v1.DepthEstimator" in services and "grpc.health.v1.Health" in services


def test_list_models(client):
    models = {m.name: m for m in client.models()}
    assert list(models) == ["rel", "metric"]
    rel, metric = models["rel"], models["metric"]
    assert (rel.is_default, rel.ready, rel.architecture, rel.kind) == (True, True, "depth_anything", "relative_disparity")
    assert (metric.is_default, metric.kind, metric.device, metric.dtype) == (False, "metric", "cpu", "float32")
    assert not rel.demo and rel.note == ""


def test_health_is_not_serving_until_every_model_is_warm(tiny_models):
    settings = settings_for(tiny_models)
    pool = GatedPool(settings)
    running = DaemonThread(settings, pool)
    try:
        with DepthClient(running.address, timeout=10) as client:
            assert client.health() == "NOT_SERVING"
            assert client.health("depthd.v1.DepthEstimator/rel") == "NOT_SERVING"
            assert [m.ready for m in client.models()] == [False, False]
            with pytest.raises(DepthdError) as caught:
                client.estimate(scene(64, 48))
            assert caught.value.code is grpc.StatusCode.UNAVAILABLE and "still loading" in caught.value.details

            pool.gate.set()
            client.wait_until_serving(60)
            assert client.health("depthd.v1.DepthEstimator/metric") == "SERVING"
            assert client.estimate(scene(64, 48)).ok
    finally:
        pool.gate.set()
        assert running.stop() == 0


def test_a_cancelled_stream_frees_its_queued_frames(tiny_models):
    running = DaemonThread(settings_for(tiny_models, max_batch=1))
    entered, release = threading.Event(), threading.Event()
    try:
        with DepthClient(running.address) as client:
            client.wait_until_serving(60)
            pool = running.daemon.pool
            model = pool.engine("rel").checkpoint.model
            forward = model.forward

            def blocking_forward(*args, **kwargs):
                entered.set()
                release.wait(30)
                return forward(*args, **kwargs)

            model.forward = blocking_forward
            with grpc.insecure_channel(running.address) as channel:
                requests = [_raw_request(frame_id=i) for i in range(3)]
                call = depth_pb2_grpc.DepthEstimatorStub(channel).EstimateStream(iter(requests))
                assert entered.wait(30)
                wait_for(lambda: rel(client).queue_depth == 1, "the next frame to queue (stream_window=2)")
                call.cancel()
                release.set()
                wait_for(lambda: rel(client).queue_depth == 0 and rel(client).bytes_held == 0, "the queue to empty")
            model.forward = forward
            assert rel(client).frames_total == 1, "frames of a cancelled stream were computed"
            assert client.estimate(scene(64, 48)).ok
    finally:
        release.set()
        running.stop()


def rel(client: DepthClient):
    return next(m for m in client.models() if m.name == "rel")


def test_the_client_package_works_without_torch(daemon):
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['transformers'] = None\n"
        "import numpy as np\n"
        "import depthd_client\n"
        f"client = depthd_client.DepthClient({daemon.address!r})\n"
        "result = client.estimate(np.zeros((48, 64, 3), np.uint8))\n"
        "print(result.kind, result.depth.shape)\n"
        "assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules if sys.modules[m] is not None)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["relative_disparity", "(48,", "64)"]
