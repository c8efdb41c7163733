"""Bounded by construction: what one frame may cost, what a reply may weigh, what the daemon may hold,
how far a sender may run ahead, and that no input, however broken, gets INTERNAL.

Each test reproduces a finding of the hard test the daemon was put through (issue 10) and
checks the bound that now holds. A model's forward pass is held at a gate where a test needs
frames lined up; nothing asserts on time except one generous ratio.
"""

from __future__ import annotations

import io
import logging
import math
import struct
import threading
import time
import zlib

import grpc
import numpy as np
import pytest
from daemon import DaemonThread, gated_daemon, in_thread, wait_for
from PIL import Image
from scenes import scene

from depthd.config import Limits, ModelSettings, Settings
from depthd.domain import Frame, OutputSpec
from depthd.engine.engine import DepthEngine
from depthd_client import DepthClient, DepthdError, StreamFrame
from depthd_client.v1 import depth_pb2 as pb
from depthd_client.v1 import depth_pb2_grpc

MIB = 1024 * 1024
WINDOW = 2
BUDGET = 24 * MIB
LIMITS = Limits(
    max_message_bytes=4 * MIB,
    max_output_side=1024,
    stream_window=WINDOW,
    max_pending_bytes=64 * MIB,
)
SMALL = ((48, 64),)


@pytest.fixture(scope="module")
def daemon(tiny_models):
    source = str(tiny_models["depth_anything"])
    settings = Settings(
        listen=("127.0.0.1:0",),
        models=(
            ModelSettings("rel", source, warmup_sizes=SMALL, max_batch=1, max_queue_bytes=BUDGET),
            # small frames at a small size: for tests that need many forward passes, not big ones
            ModelSettings("fair", source, warmup_sizes=SMALL, max_batch=1, max_processed_side=112),
        ),
        limits=LIMITS,
    )
    yield from gated_daemon(settings, ("rel", "fair"))


@pytest.fixture
def client(daemon):
    with DepthClient(daemon.address, timeout=60) as c:
        yield c


def info(client: DepthClient, name: str = "rel"):
    return next(m for m in client.models() if m.name == name)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def raw_request(width: int, height: int, channels: int = 3, **fields) -> pb.EstimateRequest:
    fmt = pb.PIXEL_FORMAT_GRAY8 if channels == 1 else pb.PIXEL_FORMAT_RGB8
    data = bytes(width * height * channels)
    return pb.EstimateRequest(image=pb.Image(raw=pb.RawImage(width=width, height=height, format=fmt, data=data)), **fields)


def call(daemon, request: pb.EstimateRequest) -> pb.EstimateResponse:
    with grpc.insecure_channel(daemon.address, options=[("grpc.max_receive_message_length", -1)]) as channel:
        return depth_pb2_grpc.DepthEstimatorStub(channel).Estimate(request, timeout=60)


def refused(daemon, request: pb.EstimateRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(daemon, request)
    return caught.value


# --- 1. compute per frame is capped ---------------------------------------------------------


SHAPES = [(480, 640), (6000, 518), (518, 6000), (16, 1200), (1200, 16), (20000, 16), (16, 20000), (37, 4000)]


@pytest.mark.parametrize("architecture", ["depth_anything", "zoedepth", "glpn", "dpt", "depth_pro"])
def test_every_frame_is_processed_within_the_size_cap(tiny_models, architecture):
    engine = DepthEngine.load(ModelSettings("capped", str(tiny_models[architecture])))
    cap, multiple = engine.max_processed_side, engine.recipe.cap.multiple
    fixed = engine.recipe.config.size if not engine.recipe.config.keep_aspect_ratio else None
    for height, width in SHAPES:
        processed = engine.processed_size(height, width)
        assert max(processed) <= max(cap, *(fixed or (0,))), (height, width, processed)
        assert min(processed) >= multiple and all(side % multiple == 0 for side in processed), (height, width, processed)
    for height, width in [(6000, 518), (16, 1200), (1200, 16)]:
        result = engine.estimate([Frame(scene(width, height))], [OutputSpec(width=64)])[0]
        assert result.depth.shape == (max(1, round(height * 64 / width)), 64)
        assert np.isfinite(result.depth).all()


def test_long_thin_frames_get_depth_not_internal(daemon, client):
    for width, height in [(1200, 16), (16, 1200), (20000, 16), (16, 20000)]:
        output = pb.OutputOptions(width=64) if width > height else pb.OutputOptions(height=64)
        reply = call(daemon, pb.EstimateRequest(image=pb.Image(encoded=png(scene(width, height))), output=output))
        expected = (64, max(1, round(height * 64 / width))) if width > height else (max(1, round(width * 64 / height)), 64)
        assert (reply.depth.width, reply.depth.height) == expected, (width, height)
    gray = call(daemon, raw_request(16, 20000, channels=1, output=pb.OutputOptions(height=100)))
    assert (gray.depth.width, gray.depth.height) == (1, 100)


def test_the_worst_legal_frame_costs_a_bounded_multiple_of_a_normal_one(client):
    def inference_ms(width: int, height: int) -> float:
        frame = png(scene(width, height))
        return float(np.median([client.estimate(frame, model="rel", width=64).timing.inference_ms for _ in range(3)]))

    normal, long = inference_ms(640, 480), inference_ms(518, 6000)
    # Uncapped, the tall frame had 8.7 times the tokens (20-30 times the time); capped, fewer than 640x480's.
    assert long < 3 * normal, (long, normal)


# --- 2. the reply is bounded before any work -----------------------------------------------


def test_an_output_size_derived_from_the_aspect_ratio_is_checked(daemon):
    error = refused(daemon, raw_request(16, 512, output=pb.OutputOptions(width=1024)))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "1024x32768" in error.details() and "limits.max_output_side" in error.details()
    error = refused(daemon, raw_request(2000, 16))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "the input's size" in error.details()


def test_a_reply_over_max_message_bytes_is_refused_before_any_work(daemon, client):
    before = info(client).frames_total
    error = refused(daemon, raw_request(64, 48, output=pb.OutputOptions(width=1024, height=1024)))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "limits.max_message_bytes" in error.details()
    # a header that claims a large image: the map it would give is refused from the header alone
    buffer = io.BytesIO()
    Image.new("L", (1024, 1024)).save(buffer, format="JPEG", quality=1)
    error = refused(daemon, pb.EstimateRequest(image=pb.Image(encoded=buffer.getvalue()[:600])))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "1024x1024" in error.details()
    half = call(daemon, raw_request(64, 48, output=pb.OutputOptions(width=1024, height=1024,
                                                                   encoding=pb.DEPTH_ENCODING_FLOAT16)))
    assert len(half.depth.data) == 1024 * 1024 * 2
    assert info(client).frames_total == before + 1


def test_list_models_says_what_a_client_must_receive(client, daemon):
    with grpc.insecure_channel(daemon.address) as channel:
        reply = depth_pb2_grpc.DepthEstimatorStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
    assert reply.max_message_bytes == LIMITS.max_message_bytes
    rel = info(client)
    assert rel.max_processed_side == 1036 and rel.max_queue_bytes == BUDGET


@pytest.mark.slow
def test_the_client_takes_the_largest_map_a_daemon_may_be_set_to_send(tiny_models):
    """8192x8192 float32 is 268 435 456 bytes: over the old client's 256 MiB, within 2 GiB."""
    settings = Settings(listen=("127.0.0.1:0",), models=(
        ModelSettings("rel", str(tiny_models["depth_anything"]), warmup_sizes=SMALL, max_queue_bytes=2048 * MIB),),
        limits=Limits(max_message_bytes=300 * MIB, max_pending_bytes=2048 * MIB))
    running = DaemonThread(settings)
    try:
        with DepthClient(running.address, timeout=120) as client:
            client.wait_until_serving(60)
            result = client.estimate(scene(64, 48), width=8192, height=8192)
            assert result.depth.shape == (8192, 8192) and result.depth.dtype == np.float32
    finally:
        assert running.stop() == 0


# --- 3. memory is bounded in bytes ---------------------------------------------------------


def test_frames_past_the_byte_budget_are_refused_and_their_bytes_come_back(daemon, client):
    gate = daemon.gates["rel"]
    frame = np.zeros((1000, 1000, 3), np.uint8)  # 3 MB in, a 4 MB map out: about 7 MB held each
    gate.shut()
    try:
        calls = [in_thread(client.estimate, frame)]
        assert gate.entered.wait(30)
        calls += [in_thread(client.estimate, frame) for _ in range(2)]
        wait_for(lambda: info(client).queue_depth == 2, "two frames waiting behind the gate")
        with pytest.raises(DepthdError) as caught:
            client.estimate(frame)
        held = info(client).bytes_held
    finally:
        gate.release()
    for thread, _ in calls:
        thread.join(60)

    assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue_bytes" in caught.value.details
    assert 3 * 7_000_000 <= held <= BUDGET
    assert all(box and box[0].ok for _, box in calls)
    wait_for(lambda: info(client).bytes_held == 0, "every byte to come back")
    assert info(client).bytes_peak <= BUDGET


def test_replies_waiting_for_a_reader_that_never_reads_are_counted(daemon, client):
    map_bytes = 1000 * 1000 * 4
    requests = (raw_request(64, 48, frame_id=i, output=pb.OutputOptions(width=1000, height=1000)) for i in range(50))
    with grpc.insecure_channel(daemon.address) as channel:
        stuck = depth_pb2_grpc.DepthEstimatorStub(channel).EstimateStream(requests)  # never read
        wait_for(lambda: info(client).bytes_held >= (WINDOW + 1) * map_bytes, "the unread replies to be counted")
        assert info(client).bytes_held <= (WINDOW + 2) * (map_bytes + 64 * 1024)
        stuck.cancel()
    wait_for(lambda: info(client).bytes_held == 0, "the cancelled stream's bytes to come back")


# --- 4. a stream is held at its window -----------------------------------------------------


def test_a_stream_sending_as_fast_as_it_can_is_held_at_its_window(daemon, client):
    gate = daemon.gates["fair"]
    frame_bytes = 64 * 48 * 3
    # what gRPC itself may buffer: the server's fixed window and the client's send buffer
    buffered = math.ceil(2 * LIMITS.transport_window_bytes / frame_bytes) + 2
    pulled, ages = [0], []
    gate.shut()

    def frames():
        for index in range(200):
            pulled[0] += 1
            yield StreamFrame(np.zeros((48, 64, 3), np.uint8), frame_id=index)

    thread, box = in_thread(lambda: [ages.append(pulled[0] - r.frame_id) or r for r in client.stream(frames(), model="fair")])
    try:
        assert gate.entered.wait(30)
        accepted_before_any_answer = settled(lambda: pulled[0])
    finally:
        gate.release()
    thread.join(120)

    assert accepted_before_any_answer <= WINDOW + 1 + buffered, accepted_before_any_answer
    assert len(box[0]) == 200 and all(r.ok for r in box[0])
    assert max(ages) <= WINDOW + 1 + buffered, "an answer came back older than the window"


def settled(read, quiet: float = 0.5, timeout: float = 30.0):
    """`read()` once it has not changed for `quiet` seconds: a sender has stopped because it is held."""
    deadline = time.monotonic() + timeout
    value = read()
    while time.monotonic() < deadline:
        time.sleep(quiet)
        if read() == value:
            return value
        value = read()
    raise AssertionError(f"still changing after {timeout} s: {value}")


# --- 5. latest-frame-wins streams are served round-robin ------------------------------------


def test_latest_frame_wins_streams_keep_their_turn_when_a_frame_is_replaced(daemon, client):
    gate, passes, stop = daemon.gates["fair"], 16, threading.Event()
    served: list[str] = []
    gate.shut()

    def camera(name: str, answered: threading.Semaphore | None):
        index = 0
        while not stop.is_set():
            if answered is None:  # the fast camera: a frame every 2 ms, each replacing the one waiting
                stop.wait(0.002)
            elif not answered.acquire(timeout=0.05):  # the slow ones: the next frame once answered
                continue
            index += 1
            yield StreamFrame(np.zeros((48, 64, 3), np.uint8), frame_id=index)

    def watch(name: str, answered: threading.Semaphore | None):
        for result in client.stream(camera(name, answered), model="fair", latest_frame_wins=True):
            if result.ok:
                served.append(name)
                if answered is not None:
                    answered.release()

    cameras = {"fast": None, **{f"slow{i}": threading.Semaphore(1) for i in range(3)}}
    threads = [in_thread(watch, name, answered)[0] for name, answered in cameras.items()]
    try:
        for done in range(passes):
            wait_for(lambda: info(client, "fair").queue_depth >= 3, "a frame of every stream at the model")
            gate.step()
            wait_for(lambda done=done: len(served) == done + 1, "the pass to be answered")
    finally:
        stop.set()
        gate.release()
    for thread in threads:
        thread.join(30)

    turns = [i for i, name in enumerate(served[:passes]) if name == "fast"]
    gaps = np.diff([-1, *turns, passes])
    assert len(turns) >= passes // 4 - 1 and gaps.max() <= 5, served[:passes]


# --- 7. bad input never gets INTERNAL ------------------------------------------------------


def _png_with_text_bomb() -> bytes:
    """A valid 32x32 PNG with a zTXt chunk that inflates to 50 MB: Pillow refuses it with ValueError."""
    base = png(scene(32, 32))
    body = b"Comment\x00\x00" + zlib.compress(b"\x00" * 50_000_000, 9)
    chunk = struct.pack(">I", len(body) - 0) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
    return base[:33] + chunk + base[33:]


def _formats() -> dict[str, bytes]:
    pixels = scene(40, 30, seed=3)
    out = {}
    for name, options in [("PNG", {}), ("JPEG", {"quality": 80}), ("WEBP", {"quality": 80}), ("TIFF", {}),
                          ("TIFF", {"compression": "tiff_deflate"}), ("BMP", {})]:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=name, **options)
        out[f"{name}-{options.get('compression', '')}"] = buffer.getvalue()
    return out


def _mutations(seed: int, count: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    originals = list(_formats().values())
    out = []
    for _ in range(count):
        data = bytearray(originals[rng.integers(len(originals))])
        kind = rng.integers(4)
        if kind == 0:  # flip a few bytes, header included
            for _ in range(rng.integers(1, 8)):
                data[rng.integers(len(data))] = rng.integers(256)
        elif kind == 1:  # truncate
            data = data[: rng.integers(1, len(data))]
        elif kind == 2:  # insert random bytes
            at = rng.integers(len(data))
            data[at:at] = rng.integers(0, 256, rng.integers(1, 64), dtype=np.uint8).tobytes()
        else:  # set a 16- or 32-bit field to an extreme
            at = rng.integers(len(data) - 4)
            data[at:at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"])
        out.append(bytes(data))
    return out


def test_no_broken_image_gets_internal(daemon, client, caplog):
    frames = [_png_with_text_bomb(), *_formats().values(), *_mutations(seed=10, count=300)]
    with caplog.at_level(logging.INFO, logger="depthd"):
        results = list(client.stream((StreamFrame(f, frame_id=i) for i, f in enumerate(frames)), model="rel", width=32))

    assert [r.frame_id for r in results] == list(range(len(frames)))
    codes = {r.error.code for r in results if r.error}
    assert grpc.StatusCode.INTERNAL not in codes, [r.error for r in results if r.error][:3]
    assert results[0].error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert all(r.ok for r in results[1:7]), "the unmutated images must decode"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) <= 21, "refusals are logged, briefly and rate-limited"


def test_refusals_are_logged_at_most_twenty_a_minute_then_counted(caplog):
    from depthd.server.status import RateLimited

    now = [0.0]
    limited = RateLimited(logging.getLogger("depthd.test"), logging.INFO, per_minute=20, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="depthd.test"):
        for i in range(50):
            limited.log("refused %d", i)
        now[0] = 61.0
        limited.log("refused again")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:20] == [f"refused {i}" for i in range(20)]
    assert lines[20:] == ["30 more like the lines above were not logged in the last minute", "refused again"]
    assert all(r.levelno == logging.INFO and not r.exc_info for r in caplog.records)


# --- 10. defects found reading the code ----------------------------------------------------


def test_a_failed_frame_names_the_model_that_would_have_answered(client):
    [result] = list(client.stream([StreamFrame(b"garbage", frame_id=1)]))
    assert result.error.code is grpc.StatusCode.INVALID_ARGUMENT and result.model == "rel"


def test_a_reader_that_fails_ends_the_stream_instead_of_hanging_it(daemon, client, monkeypatch):
    service = daemon.daemon.server.servicer
    monkeypatch.setattr(service, "_submit", lambda *args: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(DepthdError) as caught:
        list(client.stream([scene(64, 48)], timeout=20))
    assert caught.value.code is grpc.StatusCode.INTERNAL


def test_a_latest_frame_dropped_while_it_decodes_is_dropped_quietly(daemon, client, monkeypatch, caplog):
    import depthd.serving.pool

    gate, decoding, release = daemon.gates["rel"], threading.Event(), threading.Event()
    real_decode = depthd.serving.pool.decode

    def slow_decode(source, *args):
        if getattr(source, "data", b"") == b"slow and broken":
            decoding.set()
            release.wait(30)
        return real_decode(source, *args)

    monkeypatch.setattr(depthd.serving.pool, "decode", slow_decode)
    gate.shut()

    def camera():
        yield StreamFrame(scene(64, 48), frame_id=0)
        assert gate.entered.wait(30)
        yield StreamFrame(b"slow and broken", frame_id=1)
        assert decoding.wait(30)
        yield StreamFrame(scene(64, 48), frame_id=2)  # drops frame 1, still decoding
        wait_for(lambda: info(client).frames_dropped >= 1 and info(client).bytes_held < 1_000_000, "the drop")
        release.set()
        gate.release()

    with caplog.at_level(logging.INFO):
        results = list(client.stream(camera(), model="rel", latest_frame_wins=True))
    assert [(r.frame_id, r.ok, r.dropped) for r in results] == [(0, True, False), (1, False, True), (2, True, False)]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_streams_cut_short_leave_no_unretrieved_task_errors(daemon, client, caplog):
    import gc

    for _ in range(3):
        more = threading.Event()

        def camera(more=more):
            yield StreamFrame(scene(64, 48))
            more.wait(10)  # the client cancels while the daemon waits for this frame
            yield StreamFrame(scene(64, 48))

        results = client.stream(camera(), model="rel")
        assert next(results).ok
        results.close()
        more.set()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        wait_for(lambda: info(client).bytes_held == 0, "the streams to end")
        gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
