"""One model's batcher: its waiting frames, in lanes served round-robin, and the worker thread
that gathers them into forward passes.

A frame submitted to the pool is decoded (and, on CUDA, pre-processed) on a decode thread
while the model runs the batch before, queued in its stream's lane, and picked up by the
worker, which gathers frames of one processed size, round-robin across lanes, up to
`max_batch` before a `time.monotonic()` deadline, runs them in one forward pass and hands
each caller its result through a `concurrent.futures.Future`. The worker does nothing but
forward passes: each result's visualization PNG is encoded on the pool's executor.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Executor, Future, InvalidStateError
from dataclasses import dataclass, field

from depthd.config import ModelSettings
from depthd.domain import DepthResult, Frame, Geometry, OutputSpec
from depthd.engine.engine import NO_GEOMETRY, DepthEngine, Prepared
from depthd.engine.geometry import Stabilizer
from depthd.errors import DeadlineExceeded, DepthdError, ResourceExhausted, Unavailable
from depthd.serving.budget import ByteBudget, Hold
from depthd.serving.frames import ImageSource, encode_png

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolResult:
    """A frame's depth, with the whole path's timing; `result` is None for a dropped frame.

    Its reply's bytes stay counted against the memory budget until `release` (after the
    reply is sent); a result that is never released holds them until it is collected.
    """

    result: DepthResult | None
    model: str
    queue_ms: float
    total_ms: float
    visualization_png: bytes | None = None
    hold: Hold | None = field(default=None, repr=False, compare=False)

    @property
    def dropped(self) -> bool:
        return self.result is None

    def release(self) -> None:
        if self.hold is not None:
            self.hold.release()


def release_result(future: "Future[PoolResult]") -> None:
    """A done-callback that gives back a result's bytes, whatever became of the call that asked."""
    if not future.cancelled() and future.exception() is None:
        future.result().release()


class Lane:
    """One stream's place in the pool.

    The batcher takes frames round-robin across lanes, so a stream sending fast
    cannot starve the others; a latest-frame-wins frame replaces its lane's frame
    still waiting for the same model, and the lane keeps its turn. Unary calls each
    get a lane of their own.
    """

    def __init__(self) -> None:
        self.dropped = 0
        """Frames of this lane dropped for a newer one."""
        self.stabilizers: dict[str, Stabilizer] = {}
        """Per model, this stream's running reference (stabilize): gone with the stream."""

    def stabilizer(self, model: str) -> Stabilizer:
        return self.stabilizers.setdefault(model, Stabilizer())


@dataclass(eq=False)
class Job:
    """One frame's trip through the pool: its image, what to send back, its future and its bytes."""

    source: ImageSource | None
    """The request's image; let go once decoded, or dropped."""
    output: OutputSpec
    future: Future
    arrived: float
    deadline: float | None
    lane: object
    hold: Hold
    geometry: Geometry = NO_GEOMETRY
    frame: Frame | None = None
    processed: tuple[int, int] | None = None
    """The size the model sees this frame at: only frames of one size share a batch."""
    prepared: Prepared | None = None
    dropped: bool = False
    kept_bytes: int = 0
    """Besides its pixels, what the frame holds once decoded: its input tensor on the device and its reply."""

    def start(self) -> bool:
        """Move the future to running, unless it was cancelled or already answered (dropped, aborted).
        Only ever called with the batcher's condition held, so no two threads race on it."""
        return not self.future.done() and self.future.set_running_or_notify_cancel()


def _settle(future: Future, result: PoolResult | None = None, error: BaseException | None = None) -> bool:
    """Resolve `future` unless something else already did (a drop, a shutdown); True if this did."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        return False
    return True


class Batcher:
    """One model's queue and batching worker.

    A job is *waiting* from `admit` until the batcher takes it: first decoding and
    pre-processing on a decode thread, then in its lane's queue. `heartbeat` is the
    last time the worker loop showed progress: after each batch, and every
    `heartbeat_s` while idle. A forward pass that hangs stops it.
    """

    def __init__(
        self, settings: ModelSettings, engine: DepthEngine, heartbeat_s: float, budget: ByteBudget, executor: Executor
    ):
        self.settings = settings
        self.engine = engine
        self.max_batch = settings.max_batch or engine.default_max_batch
        self.heartbeat_s = heartbeat_s
        self.heartbeat = time.monotonic()
        self.budget = budget
        self.executor = executor
        """Where results are finished (their visualization encoded) off the worker thread."""
        self.warmup_s = 0.0
        """The longest warm-up forward pass: what a frame costs this model, give or take."""
        self.condition = threading.Condition()
        self.closing = False
        self.waiting: dict[object, list[Job]] = {}
        """Per lane, its waiting requests, in submission order."""
        self.lanes: dict[object, collections.deque[Job]] = {}
        """Per lane, its requests ready for a batch; dict order is the round-robin order. A lane
        whose ready frame was replaced keeps its entry, empty, while the newer frame decodes."""
        self.running: list[Job] = []
        self.pending = 0
        self.ready = 0
        self.queue_peak = 0
        self.frames_total = 0
        self.frames_dropped = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.thread = threading.Thread(target=self._run, name=f"depthd-model-{settings.name}", daemon=True)

    def admit(self, request: Job, latest_wins: bool) -> None:
        """Count a new request against max_queue; with `latest_wins`, its lane's waiting frames give way."""
        with self.condition:
            if self.closing:
                raise Unavailable(f"model {self.settings.name!r} is shutting down")
            older = list(self.waiting.get(request.lane, [])) if latest_wins else []
            if self.pending - len(older) >= self.settings.max_queue:
                raise ResourceExhausted(
                    f"model {self.settings.name!r} has {self.pending} frames waiting, its limit (max_queue)"
                )
            self.pending += 1
            self.queue_peak = max(self.queue_peak, self.pending)
            self.waiting.setdefault(request.lane, []).append(request)
            for waiting in older:
                self._drop(waiting)

    def fail(self, request: Job, error: BaseException | None) -> None:
        """A waiting request that will not reach a batch: it failed to decode (`error`), or was cancelled."""
        with self.condition:
            if request.dropped:
                return
            self._forget(request)
            self.condition.notify()
            starts = error is not None and request.start()
        request.hold.release()
        if starts:
            _settle(request.future, error=error)

    def put(self, request: Job) -> None:
        with self.condition:
            if request.dropped:
                return
            self.lanes.setdefault(request.lane, collections.deque()).append(request)
            self.ready += 1
            self.condition.notify()

    def close(self) -> None:
        with self.condition:
            self.closing = True
            self.condition.notify_all()

    def abort(self, error: BaseException) -> int:
        """Fail every frame still waiting or in a forward pass with `error` (shutdown's last step)."""
        with self.condition:
            requests = [r for lane in self.waiting.values() for r in lane] + self.running
            failing = [r for r in requests if r.future.running() or r.start()]
        for request in requests:
            request.hold.release()
        return sum(_settle(request.future, error=error) for request in failing)

    def _drop(self, request: Job) -> None:
        """Called with the condition held: `request` gives way to a newer frame of its lane."""
        self._forget(request)
        request.dropped = True
        request.source = request.frame = request.prepared = None
        request.hold.release()
        queue = self.lanes.get(request.lane)
        if queue is not None and request in queue:
            queue.remove(request)
            self.ready -= 1
        self.frames_dropped += 1
        if isinstance(request.lane, Lane):
            request.lane.dropped += 1
        if request.start():
            waited = (time.monotonic() - request.arrived) * 1000
            _settle(request.future, PoolResult(None, self.settings.name, waited, waited))

    def _forget(self, request: Job) -> None:
        self.pending -= 1
        lane = self.waiting[request.lane]
        lane.remove(request)
        if not lane:
            del self.waiting[request.lane]
            if not self.lanes.get(request.lane, True):
                del self.lanes[request.lane]  # kept for a newer frame that is no longer coming

    def _run(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            if batch:
                self._process(batch)
            with self.condition:
                self.running = []

    def _gather(self) -> list[Job] | None:
        """Wait for a frame, then for more until max_batch or max_wait_ms; None when closed and empty."""
        with self.condition:
            while not self.ready:
                if self.closing and not self.pending:
                    return None
                self.condition.wait(self.heartbeat_s)
                self.heartbeat = time.monotonic()
            deadline = time.monotonic() + self.settings.max_wait_ms / 1000
            while self.ready < self.max_batch and not self.closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.condition.wait(left)
            batch = self._take()
            for request in batch:
                self._forget(request)
            self.ready -= len(batch)
            started = [request for request in batch if request.start()]
            self.running = started
        now = time.monotonic()
        live = []
        for request in batch:
            if request not in started:
                request.hold.release()
            elif request.deadline is not None and now > request.deadline:
                _settle(request.future, error=DeadlineExceeded("the deadline passed while the frame waited for the model"))
                request.hold.release()
            else:
                live.append(request)
        return live

    def _take(self) -> list[Job]:
        """Up to max_batch ready frames of one processed size: the size of the oldest ready frame,
        then one frame per lane per round, lanes served last going last."""
        oldest = min((queue[0] for queue in self.lanes.values() if queue), key=lambda r: r.arrived)
        size = oldest.processed
        batch: list[Job] = []
        taken = True
        while taken and len(batch) < self.max_batch:
            taken = False
            for lane in list(self.lanes):
                queue = self.lanes[lane]
                if not queue or queue[0].processed != size:
                    continue
                batch.append(queue.popleft())
                taken = True
                del self.lanes[lane]
                if queue:
                    self.lanes[lane] = queue
                if len(batch) == self.max_batch:
                    break
        return batch

    def _prepared(self, batch: list[Job]) -> list[Prepared]:
        """The batch's input tensors: made on the decode threads where that overlaps the forward
        pass (CUDA), or here, where it would only compete with it for the cores (CPU)."""
        late = [job for job in batch if job.prepared is None]
        for job, prepared in zip(late, self.engine.prepare([j.frame for j in late], [j.output.point_cloud_rgb for j in late])):
            job.prepared = prepared
        return [job.prepared for job in batch]

    def _process(self, batch: list[Job]) -> None:
        started = time.monotonic()
        try:
            prepared = self._prepared(batch)
            results = self.engine.infer(
                prepared, [job.output for job in batch], [job.geometry for job in batch],
                [self._stabilizer(job) for job in batch],
            )
        except Exception as error:
            if len(batch) > 1:
                # Frames of other streams shared this pass: run each alone, so only
                # the frame that fails gets the error.
                logger.warning("batch failed model=%s batch=%d: retrying its frames one by one (%s)",
                               self.settings.name, len(batch), error)
                for request in batch:
                    self._process([request])
                return
            if not isinstance(error, DepthdError):
                logger.exception("forward pass failed model=%s", self.settings.name)
            batch[0].hold.release()
            _settle(batch[0].future, error=error)
            return
        self.batch_sizes[len(batch)] += 1
        self.frames_total += len(batch)
        self.heartbeat = time.monotonic()
        for job, result in zip(batch, results):
            job.source = job.frame = job.prepared = None
            if isinstance(result, DepthdError):
                job.hold.release()
                _settle(job.future, error=result)
                continue
            try:
                self.executor.submit(self._finish, job, result, started)
            except RuntimeError:  # shut down: the daemon has stopped waiting for this answer
                job.hold.release()

    def _stabilizer(self, job: Job) -> Stabilizer | None:
        """The job's stream's running reference for this model, when it asks to be stabilized."""
        if job.geometry.stabilize and isinstance(job.lane, Lane):
            return job.lane.stabilizer(self.settings.name)
        return None

    def _finish(self, job: Job, result: DepthResult, started: float) -> None:
        """On the pool's executor: encode the visualization, count the reply's real bytes, answer."""
        png = encode_png(result.visualization) if result.visualization is not None else None
        points = sum(array.nbytes for array in (result.points, result.points_rgb) if array is not None)
        job.hold.shrink_to(result.depth.nbytes + len(png or b"") + points)
        done = time.monotonic()
        answer = PoolResult(
            result=result,
            model=self.settings.name,
            queue_ms=(started - job.arrived) * 1000,
            total_ms=(done - job.arrived) * 1000,
            visualization_png=png,
            hold=job.hold,
        )
        if not _settle(job.future, answer):
            job.hold.release()
