"""Streaming behaviour under load: batches across streams, latest-frame-wins, and bounded queues.

The forward pass of the served tiny model is held shut by a gate while a test lines
frames up behind it, so what the batcher does with them is decided, not raced.
Nothing here asserts on time.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from daemon import gated_daemon, in_thread, queue, wait_for
from scenes import scene

from depthd.config import Limits, ModelSettings, Settings
from depthd.domain import OutputSpec, PixelFormat
from depthd.errors import DeadlineExceeded
from depthd.serving.frames import RawImage
from depthd_client import DepthClient, DepthdError

WINDOW = 2
TIGHT_MAX_QUEUE = 3


@pytest.fixture(scope="module")
def daemon(tiny_models):
    source = str(tiny_models["depth_anything"])
    settings = Settings(
        listen=("127.0.0.1:0",),
        models=(
            ModelSettings("batched", source, warmup_sizes=((64, 96),), max_batch=4, max_wait_ms=20),
            ModelSettings("solo", source, warmup_sizes=((64, 96),), max_batch=1),
            ModelSettings("tight", source, warmup_sizes=((64, 96),), max_batch=1, max_queue=TIGHT_MAX_QUEUE),
        ),
        limits=Limits(stream_window=WINDOW),
    )
    yield from gated_daemon(settings, ("batched", "solo", "tight"))


@pytest.fixture
def client(daemon):
    with DepthClient(daemon.address, timeout=60) as c:
        yield c


def model_info(client: DepthClient, name: str):
    return next(m for m in client.models() if m.name == name)


def test_frames_from_several_streams_share_a_forward_pass_and_match_unbatched(daemon, client):
    gate = daemon.gates["batched"]
    before = model_info(client, "batched").batch_sizes
    gate.shut()
    first, first_result = in_thread(lambda: list(client.stream([scene(96, 64, seed=9)], model="batched")))
    assert gate.entered.wait(30)
    # Three streams, one frame each, while the model is busy: two landscape frames can
    # share a pass, the portrait one (another processed size) must not join them.
    frames = [scene(96, 64, seed=1), scene(96, 64, seed=2), scene(64, 96, seed=3)]
    streams = [in_thread(lambda f=f: list(client.stream([f], model="batched"))) for f in frames]
    wait_for(lambda: queue(daemon, "batched").queue_ready == 3, "three frames waiting for the model")
    gate.release()
    for thread, _ in [(first, first_result), *streams]:
        thread.join(30)
    results = [box[0][0] for _, box in streams]

    assert all(r.ok for r in results)
    assert [r.timing.batch_size for r in results] == [2, 2, 1]
    after = model_info(client, "batched").batch_sizes
    assert after.get(2, 0) == before.get(2, 0) + 1
    assert after.get(1, 0) == before.get(1, 0) + 2

    for frame, batched in zip(frames, results):
        alone = client.estimate(frame, model="batched")
        assert alone.timing.batch_size == 1
        np.testing.assert_allclose(batched.depth, alone.depth, rtol=1e-4, atol=1e-6)


def test_a_frame_that_breaks_the_forward_pass_fails_alone(daemon, client):
    gate = daemon.gates["batched"]
    gate.flat_frames_fail = True
    gate.shut()
    try:
        first, _ = in_thread(lambda: list(client.stream([scene(96, 64, seed=9)], model="batched")))
        assert gate.entered.wait(30)
        good_frames = [scene(96, 64, seed=5), scene(96, 64, seed=6)]
        good, good_box = in_thread(lambda: list(client.stream(good_frames, model="batched")))
        bad, bad_box = in_thread(lambda: list(client.stream([np.full((64, 96, 3), 128, np.uint8)], model="batched")))
        wait_for(lambda: queue(daemon, "batched").queue_ready == 3, "two streams' frames waiting to share a pass")
        gate.release()
        for thread in (first, good, bad):
            thread.join(30)
    finally:
        gate.flat_frames_fail = False
        gate.release()

    assert [r.ok for r in good_box[0]] == [True, True]
    [broken] = bad_box[0]
    assert broken.error.code is grpc.StatusCode.INTERNAL and broken.depth is None
    assert client.estimate(np.full((64, 96, 3), 128, np.uint8), model="batched").ok


def test_latest_frame_wins_drops_the_waiting_frame_counts_it_and_keeps_order(daemon, client):
    gate = daemon.gates["batched"]
    dropped_before = model_info(client, "batched").frames_dropped
    gate.shut()

    def camera():
        yield scene(96, 64, seed=0)
        assert gate.entered.wait(30)
        for seed in range(1, 5):  # 1 waits, 2 replaces it, 3 replaces 2, 4 replaces 3
            yield scene(96, 64, seed=seed)
        wait_for(lambda: model_info(client, "batched").frames_dropped == dropped_before + 3, "three drops")
        gate.release()

    results = list(client.stream(camera(), model="batched", latest_frame_wins=True))

    assert [r.frame_id for r in results] == [0, 1, 2, 3, 4]
    assert [r.dropped for r in results] == [False, True, True, True, False]
    assert all(r.depth is None and r.error is None for r in results[1:4])
    assert results[0].ok and results[4].ok and results[4].depth.shape == (64, 96)
    assert results[-1].stream_dropped == 3
    assert model_info(client, "batched").frames_dropped == dropped_before + 3


def test_a_lossless_stream_faster_than_the_model_is_held_to_its_window(daemon, client):
    gate = daemon.gates["solo"]
    count = 30
    gate.shut()
    frames = (scene(96, 64, seed=index % 3) for index in range(count))
    thread, box = in_thread(lambda: list(client.stream(frames, model="solo")))
    assert gate.entered.wait(30)
    wait_for(lambda: model_info(client, "solo").queue_depth == WINDOW - 1, "the window to fill")
    gate.release()
    thread.join(60)
    results = box[0]

    assert [r.frame_id for r in results] == list(range(count))
    assert all(r.ok for r in results) and results[-1].stream_dropped == 0
    info = model_info(client, "solo")
    assert info.frames_dropped == 0 and info.frames_total == count
    assert info.queue_peak <= WINDOW, "the daemon read past the stream's window"


def test_unary_calls_past_max_queue_are_refused_with_resource_exhausted(daemon, client):
    gate = daemon.gates["tight"]
    gate.shut()
    ask = lambda: client.estimate(scene(96, 64), model="tight")  # noqa: E731
    calls = [in_thread(ask)]
    assert gate.entered.wait(30)
    calls += [in_thread(ask) for _ in range(TIGHT_MAX_QUEUE)]
    wait_for(lambda: model_info(client, "tight").queue_depth == TIGHT_MAX_QUEUE, "the queue to fill")
    with pytest.raises(DepthdError) as refused:
        ask()
    gate.release()
    for thread, _ in calls:
        thread.join(30)

    assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue" in refused.value.details
    assert all(box and box[0].ok for _, box in calls)


def test_a_frame_whose_deadline_passes_while_it_waits_is_not_computed(daemon, client):
    """The pool's own deadline: checked when the batcher takes the frame, so an expired frame costs no forward pass."""
    gate = daemon.gates["solo"]
    before = model_info(client, "solo").frames_total
    gate.shut()
    busy, _ = in_thread(lambda: client.estimate(scene(96, 64), model="solo"))
    assert gate.entered.wait(30)
    frame = RawImage(96, 64, PixelFormat.RGB8, scene(96, 64).tobytes())
    late = daemon.daemon.pool.submit("solo", frame, OutputSpec(), deadline=time.monotonic() - 1)
    wait_for(lambda: queue(daemon, "solo").queue_ready == 1, "the late frame to wait behind the gate")
    gate.release()
    busy.join(30)
    with pytest.raises(DeadlineExceeded):
        late.result(timeout=30)
    assert model_info(client, "solo").frames_total == before + 1
