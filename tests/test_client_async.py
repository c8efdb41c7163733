"""The asyncio client (`AsyncDepthClient`) against a real daemon on a loopback port: the same calls,
results and errors as the sync client. Each test runs its own event loop with `asyncio.run`."""

from __future__ import annotations

import asyncio
import gc
import io
import time
import typing

import grpc
import numpy as np
import pytest
from daemon import DaemonThread
from PIL import Image
from scenes import scene

from depthd.config import Limits, ModelSettings, Settings
from depthd_client import AsyncDepthClient, DepthClient, DepthdError, RequestOptions, StreamFrame, StreamOptions, messages
from depthd_client.v1 import depth_pb2 as pb

LIMITS = Limits(max_message_bytes=4 * 1024 * 1024, max_input_pixels=1_000_000, max_output_side=1024, stream_window=2)


@pytest.fixture(scope="module")
def daemon(tiny_models):
    settings = Settings(
        listen=("127.0.0.1:0",),
        models=(
            ModelSettings("rel", str(tiny_models["depth_anything"]), warmup_sizes=((64, 96),)),
            ModelSettings("metric", str(tiny_models["depth_anything_metric"]), warmup_sizes=((64, 96),)),
        ),
        limits=LIMITS,
    )
    running = DaemonThread(settings)

    async def serving() -> None:
        async with AsyncDepthClient(running.address) as client:
            await client.wait_until_serving(60)

    asyncio.run(serving())
    yield running
    assert running.stop() == 0


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


async def eventually(condition, what: str, timeout: float = 30.0) -> None:
    """Let the event loop run (and the garbage collector) until `condition` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        gc.collect()
        await asyncio.sleep(0.01)


def test_estimate_a_numpy_frame_and_png_bytes(daemon):
    pixels = scene(120, 90)

    async def main():
        async with AsyncDepthClient(daemon.address, timeout=30) as client:
            raw = await client.estimate(pixels, frame_id=7, timestamp_ns=123456789)
            encoded = await client.estimate(png_bytes(pixels))
            bgr = await client.estimate(np.ascontiguousarray(pixels[..., ::-1]), pixel_format="bgr8")
            half = await client.estimate(pixels, model="metric", encoding="float16", width=60)
            return raw, encoded, bgr, half

    raw, encoded, bgr, half = asyncio.run(main())
    with DepthClient(daemon.address) as client:
        sync = client.estimate(pixels, frame_id=7, timestamp_ns=123456789)

    assert (raw.frame_id, raw.timestamp_ns, raw.model) == (7, 123456789, "rel")
    assert raw.kind == "relative_disparity" and raw.depth.dtype == np.float32 and raw.depth.shape == (90, 120)
    assert raw.ok and raw.timing.batch_size >= 1
    np.testing.assert_allclose(encoded.depth, raw.depth, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bgr.depth, raw.depth, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sync.depth, raw.depth, rtol=1e-5, atol=1e-6)
    assert (sync.kind, sync.frame_id, sync.model) == (raw.kind, raw.frame_id, raw.model)
    assert half.kind == "metric" and half.model == "metric"
    assert half.depth.dtype == np.float16 and half.depth.shape == (45, 60)


def test_a_stream_from_an_async_generator_survives_a_bad_frame_in_order(daemon):
    images = [scene(96, 64, seed=1), png_bytes(scene(80, 80, seed=2)), b"garbage", scene(64, 96, seed=3)]

    async def frames():
        for index, image in enumerate(images):
            await asyncio.sleep(0)  # a camera: the next frame comes later
            yield StreamFrame(image, frame_id=100 + index, timestamp_ns=index + 1)

    async def main():
        async with AsyncDepthClient(daemon.address) as client:
            from_async = [result async for result in client.stream(frames())]
            from_list = [result async for result in client.stream([images[0], images[3]], model="metric")]
            alone = await client.estimate(images[3])
            return from_async, from_list, alone

    results, plain, alone = asyncio.run(main())

    assert [(r.frame_id, r.timestamp_ns) for r in results] == [(100, 1), (101, 2), (102, 3), (103, 4)]
    assert [r.ok for r in results] == [True, True, False, True]
    assert results[2].error.code is grpc.StatusCode.INVALID_ARGUMENT and results[2].depth is None
    assert results[2].kind == ""
    assert [r.depth.shape for r in results if r.ok] == [(64, 96), (80, 80), (96, 64)]
    np.testing.assert_allclose(results[3].depth, alone.depth, rtol=1e-4, atol=1e-5)
    assert [(r.frame_id, r.model, r.kind) for r in plain] == [(0, "metric", "metric"), (1, "metric", "metric")]
    assert all(r.timestamp_ns > 0 for r in plain)


def test_a_frame_that_cannot_be_sent_raises_after_the_frames_before_it(daemon):
    frames = [scene(64, 48), np.zeros((48, 64, 3), np.float32), scene(64, 48)]

    async def main():
        got = []
        async with AsyncDepthClient(daemon.address) as client:
            with pytest.raises(ValueError, match="must be uint8"):
                async for result in client.stream(frames):
                    got.append(result)
        return got

    assert [r.ok for r in asyncio.run(main())] == [True]
    got = []
    with DepthClient(daemon.address) as client, pytest.raises(ValueError, match="must be uint8"):
        for result in client.stream(frames):
            got.append(result)
    assert [r.ok for r in got] == [True]


def test_unknown_options_are_a_type_error_naming_them(daemon):
    async def main():
        async with AsyncDepthClient(daemon.address) as client:
            with pytest.raises(TypeError, match="'colour'"):
                await client.estimate(scene(64, 48), colour="turbo")
            with pytest.raises(TypeError, match="'frame_id'.*StreamFrame"):
                client.stream([scene(64, 48)], frame_id=3)
            with pytest.raises(ValueError, match="encoding"):
                client.stream([scene(64, 48)], encoding="float64")

    asyncio.run(main())
    with DepthClient(daemon.address) as client, pytest.raises(TypeError, match="'colour'"):
        client.estimate(scene(64, 48), colour="turbo")


def test_models_health_and_wait_until_serving(daemon):
    async def main():
        async with AsyncDepthClient(daemon.address, timeout=10) as client:
            await client.wait_until_serving(10)
            await client.wait_until_serving(10, service="depthd.v1.DepthEstimator/metric")
            statuses = [
                await client.health(),
                await client.health("depthd.v1.DepthEstimator"),
                await client.health("depthd.v1.DepthEstimator/metric"),
                await client.health("depthd.v1.DepthEstimator/nope"),
            ]
            with pytest.raises(DepthdError) as waited:
                await client.wait_until_serving(0.3, service="depthd.v1.DepthEstimator/nope")
            return await client.models(), statuses, waited.value

    models, statuses, waited = asyncio.run(main())

    assert statuses == ["SERVING", "SERVING", "SERVING", "SERVICE_UNKNOWN"]
    assert waited.code is grpc.StatusCode.DEADLINE_EXCEEDED and "not SERVING" in waited.details
    assert [m.name for m in models] == ["rel", "metric"]
    rel, metric = models
    assert (rel.is_default, rel.ready, rel.architecture, rel.kind) == (True, True, "depth_anything", "relative_disparity")
    assert (metric.is_default, metric.kind, metric.device) == (False, "metric", "cpu")


def test_the_sync_clients_health_still_works(daemon):
    with DepthClient(daemon.address, timeout=10) as client:
        client.wait_until_serving(10)
        assert client.health() == "SERVING"
        assert client.health("depthd.v1.DepthEstimator/rel") == "SERVING"
        assert client.health("depthd.v1.DepthEstimator/nope") == "SERVICE_UNKNOWN"
        with pytest.raises(DepthdError) as caught:
            client.wait_until_serving(0.3, service="depthd.v1.DepthEstimator/nope")
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


def test_failed_calls_raise_depthd_error_with_the_code(daemon):
    async def main():
        async with AsyncDepthClient(daemon.address) as client:
            with pytest.raises(DepthdError) as not_found:
                await client.estimate(scene(64, 48), model="nope")
            with pytest.raises(DepthdError) as late:
                await client.estimate(scene(640, 480), timeout=0.001)
            return not_found.value, late.value

    not_found, late = asyncio.run(main())
    assert not_found.code is grpc.StatusCode.NOT_FOUND and "model 'nope' is not served" in not_found.details
    assert late.code is grpc.StatusCode.DEADLINE_EXCEEDED


def test_leaving_a_stream_early_cancels_it(daemon):
    """An endless camera: after `break`, the call is cancelled, so its frames stop being read and the
    source is let go; were it still open, the stream would keep pulling frames for ever."""
    state = {"pulled": 0, "closed": False}

    async def camera():
        try:
            while True:
                state["pulled"] += 1
                yield scene(64, 48, seed=state["pulled"] % 4)
                await asyncio.sleep(0.001)
        finally:
            state["closed"] = True

    async def main():
        async with AsyncDepthClient(daemon.address) as client:
            got = []
            async for result in client.stream(camera()):
                got.append(result)
                if len(got) == 3:
                    break
            await eventually(lambda: state["closed"], "the stream to let its frames go")
            pulled = state["pulled"]
            await asyncio.sleep(0.2)
            assert state["pulled"] == pulled, "frames were read after the stream was left"
            assert (await client.estimate(scene(64, 48))).ok
            return got

    got = asyncio.run(main())
    assert [r.frame_id for r in got] == [0, 1, 2] and all(r.ok for r in got)
    with DepthClient(daemon.address) as client:
        assert client.estimate(scene(64, 48)).ok


def test_the_literal_types_cover_the_protos_enums():
    def names(enum, prefix: str) -> set[str]:
        return {name.removeprefix(prefix).lower() for name in enum.keys() if not name.endswith("_UNSPECIFIED")}

    assert set(typing.get_args(messages.Encoding)) == names(pb.DepthEncoding, "DEPTH_ENCODING_")
    assert set(typing.get_args(messages.PixelFormat)) == names(pb.PixelFormat, "PIXEL_FORMAT_")
    assert set(typing.get_args(messages.DepthKind)) == names(pb.DepthKind, "DEPTH_KIND_")
    per_frame = {name for name in StreamFrame.__dataclass_fields__ if name != "image"}
    assert per_frame <= RequestOptions.__optional_keys__
    assert RequestOptions.__optional_keys__ - StreamOptions.__optional_keys__ == {"frame_id", "timestamp_ns", "hints"}
