"""The GPU path without stalls, exercised on the CPU through its one seam (depthd.engine.streams):
pre-processing on a decode thread issues its work on a stream of its own and never waits for the
device; the forward pass waits, on the device, for that work's marker; results come back through
copies started together and one wait on the model thread's own stream."""

from __future__ import annotations

import threading

import numpy as np
from daemon import in_thread

from depthd.config import ModelSettings
from depthd.domain import Frame, OutputSpec
from depthd.engine import streams
from depthd.engine.engine import DepthEngine


class RecordingQueue(streams.CpuQueue):
    """The CPU's queue (so the numbers are real), noting each call and the thread that made it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def note(self, call: str) -> None:
        self.calls.append((threading.current_thread().name, call))

    def side(self):
        self.note("side")
        return super().side()

    def ready(self):
        marker = object()
        self.note(f"ready {id(marker)}")
        return marker

    def wait(self, marker, tensor):
        self.note(f"wait {id(marker)}" if marker is not None else "wait")

    def finish(self):
        self.note("finish")

    def to_host(self, tensor):
        self.note("to_host")
        return tensor

    def to_device(self, tensor):
        self.note("to_device")
        return tensor


def test_the_decode_thread_never_waits_and_the_forward_waits_for_its_frames(tiny_models, monkeypatch):
    folder = str(tiny_models["depth_anything"])
    plain = DepthEngine.load(ModelSettings("plain", folder, warmup_sizes=()))
    monkeypatch.setattr(streams, "for_device", lambda device: RecordingQueue())
    engine = DepthEngine.load(ModelSettings("seam", folder, warmup_sizes=()))
    queue: RecordingQueue = engine.queue
    forward = engine._model
    engine._model = lambda batch: (queue.note("forward"), forward(batch))[1]
    frames = [Frame(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)) for seed in (1, 2)]

    thread, box = in_thread(engine.prepare, frames)
    thread.join(60)
    [prepared] = [box[0]]
    decode = thread.name
    assert [call for name, call in queue.calls] == ["side", "to_device", f"ready {id(prepared[0].ready)}"]
    assert all(name == decode for name, _ in queue.calls)
    assert prepared[0].ready is prepared[1].ready, "frames pre-processed together share one marker"

    queue.calls.clear()
    results = engine.infer(prepared, [OutputSpec(), OutputSpec()])
    calls = [call for _, call in queue.calls]
    marker = f"wait {id(prepared[0].ready)}"
    assert calls[:3] == [marker, marker, "forward"], "the forward waits (on the device) for its frames' pre-processing"
    assert calls[3:] == ["to_host"] * 4 + ["finish"], "copies start together; one wait, on the model thread's stream"
    assert {name for name, _ in queue.calls} == {threading.current_thread().name}

    expected = plain.estimate(frames, [OutputSpec(), OutputSpec()])
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got.depth, want.depth)
        assert got.timing.preprocess_ms > 0 and got.timing.inference_ms > 0
