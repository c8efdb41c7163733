"""The warm model pool: the only place with threads and queues.

It loads and warms every configured model, then runs one worker per model. A frame
submitted to the pool is decoded (and, on CUDA, pre-processed) on a decode thread
while the model runs the batch before, queued in its stream's lane, and picked up by the
model's batcher, which gathers frames of one processed size, round-robin across
lanes, up to `max_batch` before a `time.monotonic()` deadline, runs them in one
forward pass and hands each caller its result through a `concurrent.futures.Future`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from depthd.domain import DepthKind, DepthResult, Frame, OutputSpec
from depthd.engine import DEFAULT_WARMUP_SIZES, DepthEngine, EngineOptions, Prepared, set_torch_threads
from depthd.errors import DeadlineExceeded, DepthdError, NotFound, ResourceExhausted, Unavailable
from depthd.frames import FrameLimits, ImageSource, decode, encode_png

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve: a name clients use, where to load it from, and how to run it."""

    name: str
    source: str
    options: EngineOptions = field(default_factory=EngineOptions)
    warmup_sizes: tuple[tuple[int, int], ...] = DEFAULT_WARMUP_SIZES
    """(height, width) sizes to run once before the model is ready."""
    max_batch: int | None = None
    """None: the engine's default for its device (1 on CPU, 8 on CUDA)."""
    max_wait_ms: float = 2.0
    max_queue: int = 64
    demo: bool = False


@dataclass(frozen=True)
class ModelStatus:
    """What ListModels reports of one model."""

    name: str
    source: str
    is_default: bool
    ready: bool
    demo: bool
    architecture: str = ""
    kind: DepthKind | None = None
    device: str = ""
    dtype: str = ""
    frames_total: int = 0
    frames_dropped: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    """How many forward passes ran with each number of frames."""
    queue_peak: int = 0
    """The most frames waiting at once since start."""
    max_batch: int = 0


@dataclass(frozen=True)
class PoolResult:
    """A frame's depth, with the whole path's timing; `result` is None for a dropped frame."""

    result: DepthResult | None
    model: str
    queue_ms: float
    total_ms: float
    visualization_png: bytes | None = None

    @property
    def dropped(self) -> bool:
        return self.result is None


class Lane:
    """One stream's place in the pool.

    The batcher takes frames round-robin across lanes, so a stream sending fast
    cannot starve the others; a latest-frame-wins frame replaces its lane's frame
    still waiting for the same model. Unary calls each get a lane of their own.
    """

    def __init__(self) -> None:
        self.dropped = 0
        """Frames of this lane dropped for a newer one."""


@dataclass(eq=False)
class _Request:
    source: ImageSource
    spec: OutputSpec
    future: Future
    arrived: float
    deadline: float | None
    lane: object
    frame: Frame | None = None
    processed: tuple[int, int] | None = None
    """The size the model sees this frame at: only frames of one size share a batch."""
    prepared: Prepared | None = None
    dropped: bool = False


Progress = Callable[[str, int, int], None]


class _Runner:
    """One model's queue and batching worker.

    A request is *waiting* from `admit` until the batcher takes it: first decoding and
    pre-processing on a decode thread, then in its lane's queue. `heartbeat` is the
    last time the worker loop showed progress: after each batch, and every
    `heartbeat_s` while idle. A forward pass that hangs stops it.
    """

    def __init__(self, spec: ModelSpec, engine: DepthEngine, heartbeat_s: float):
        self.spec = spec
        self.engine = engine
        self.max_batch = spec.max_batch or engine.default_max_batch
        self.heartbeat_s = heartbeat_s
        self.heartbeat = time.monotonic()
        self.condition = threading.Condition()
        self.closing = False
        self.waiting: dict[object, list[_Request]] = {}
        """Per lane, its waiting requests, in submission order."""
        self.lanes: dict[object, collections.deque[_Request]] = {}
        """Per lane, its requests ready for a batch; dict order is the round-robin order."""
        self.pending = 0
        self.ready = 0
        self.queue_peak = 0
        self.frames_total = 0
        self.frames_dropped = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.thread = threading.Thread(target=self._run, name=f"depthd-model-{spec.name}", daemon=True)

    def admit(self, request: _Request, latest_wins: bool) -> None:
        """Count a new request against max_queue; with `latest_wins`, its lane's waiting frames give way."""
        with self.condition:
            if self.closing:
                raise Unavailable(f"model {self.spec.name!r} is shutting down")
            if latest_wins:
                for older in list(self.waiting.get(request.lane, [])):
                    self._drop(older)
            if self.pending >= self.spec.max_queue:
                raise ResourceExhausted(
                    f"model {self.spec.name!r} has {self.pending} frames waiting, its limit (max_queue)"
                )
            self.pending += 1
            self.queue_peak = max(self.queue_peak, self.pending)
            self.waiting.setdefault(request.lane, []).append(request)

    def abandon(self, request: _Request) -> None:
        """A waiting request that will not reach a batch: cancelled, or failed to decode."""
        with self.condition:
            if not request.dropped:
                self._forget(request)
                self.condition.notify()

    def put(self, request: _Request) -> None:
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

    def _drop(self, request: _Request) -> None:
        self._forget(request)
        request.dropped = True
        queue = self.lanes.get(request.lane)
        if queue is not None and request in queue:
            queue.remove(request)
            self.ready -= 1
            if not queue:
                del self.lanes[request.lane]
        self.frames_dropped += 1
        if isinstance(request.lane, Lane):
            request.lane.dropped += 1
        if request.future.set_running_or_notify_cancel():
            waited = (time.monotonic() - request.arrived) * 1000
            request.future.set_result(PoolResult(None, self.spec.name, waited, waited))

    def _forget(self, request: _Request) -> None:
        self.pending -= 1
        lane = self.waiting[request.lane]
        lane.remove(request)
        if not lane:
            del self.waiting[request.lane]

    def _run(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            if batch:
                self._process(batch)

    def _gather(self) -> list[_Request] | None:
        """Wait for a frame, then for more until max_batch or max_wait_ms; None when closed and empty."""
        with self.condition:
            while not self.ready:
                if self.closing and not self.pending:
                    return None
                self.condition.wait(self.heartbeat_s)
                self.heartbeat = time.monotonic()
            deadline = time.monotonic() + self.spec.max_wait_ms / 1000
            while self.ready < self.max_batch and not self.closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.condition.wait(left)
            batch = self._take()
            for request in batch:
                self._forget(request)
            self.ready -= len(batch)
        now = time.monotonic()
        live = []
        for request in batch:
            if not request.future.set_running_or_notify_cancel():
                continue
            if request.deadline is not None and now > request.deadline:
                request.future.set_exception(DeadlineExceeded("the deadline passed while the frame waited for the model"))
                continue
            live.append(request)
        return live

    def _take(self) -> list[_Request]:
        """Up to max_batch ready frames of one processed size: the size of the oldest ready frame,
        then one frame per lane per round, lanes served last going last."""
        oldest = min((queue[0] for queue in self.lanes.values()), key=lambda r: r.arrived)
        size = oldest.processed
        batch: list[_Request] = []
        taken = True
        while taken and len(batch) < self.max_batch:
            taken = False
            for lane in list(self.lanes):
                queue = self.lanes[lane]
                if queue[0].processed != size:
                    continue
                batch.append(queue.popleft())
                taken = True
                del self.lanes[lane]
                if queue:
                    self.lanes[lane] = queue
                if len(batch) == self.max_batch:
                    break
        return batch

    def _prepared(self, batch: list[_Request]) -> list[Prepared]:
        """The batch's input tensors: made on the decode threads where that overlaps the forward
        pass (CUDA), or here, where it would only compete with it for the cores (CPU)."""
        late = [r for r in batch if r.prepared is None]
        for request, prepared in zip(late, self.engine.prepare([r.frame for r in late])):
            request.prepared = prepared
        return [r.prepared for r in batch]

    def _process(self, batch: list[_Request]) -> None:
        started = time.monotonic()
        try:
            prepared = self._prepared(batch)
            results = self.engine.infer(prepared, [r.spec for r in batch])
        except Exception as error:
            if len(batch) > 1:
                # Frames of other streams shared this pass: run each alone, so only
                # the frame that fails gets the error.
                logger.warning("batch failed model=%s batch=%d: retrying its frames one by one (%s)",
                               self.spec.name, len(batch), error)
                for request in batch:
                    self._process([request])
                return
            if not isinstance(error, DepthdError):
                logger.exception("forward pass failed model=%s", self.spec.name)
            batch[0].future.set_exception(error)
            return
        self.batch_sizes[len(batch)] += 1
        self.frames_total += len(batch)
        done = self.heartbeat = time.monotonic()
        for request, result in zip(batch, results):
            png = encode_png(result.visualization) if result.visualization is not None else None
            request.future.set_result(
                PoolResult(
                    result=result,
                    model=self.spec.name,
                    queue_ms=(started - request.arrived) * 1000,
                    total_ms=(done - request.arrived) * 1000,
                    visualization_png=png,
                )
            )


class ModelPool:
    def __init__(
        self,
        specs: list[ModelSpec],
        default: str | None = None,
        limits: FrameLimits = FrameLimits(),
        decode_threads: int = 2,
        torch_threads: int = 0,
        heartbeat_s: float = 1.0,
    ):
        if not specs:
            raise ValueError("a pool needs at least one model")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if default is not None and default not in names:
            raise ValueError(f"default model {default!r} is not among {names}")
        self.specs = list(specs)
        self.default = default or names[0]
        self.limits = limits
        self.heartbeat_s = heartbeat_s
        self._runners: dict[str, _Runner] = {}
        self._decoder = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="depthd-decode")
        if torch_threads:
            set_torch_threads(torch_threads)
        self._closed = False

    # --- loading ---------------------------------------------------------------------------

    def load(self, progress: Progress | None = None, on_ready: Callable[[str], None] | None = None) -> None:
        """Load, warm and start every model in order; raises ModelLoadError on the first that fails."""
        total = len(self.specs)
        for position, spec in enumerate(self.specs, start=1):
            if self._closed:
                return
            if progress:
                progress(spec.name, position, total)
            engine = DepthEngine.load(spec.name, spec.source, spec.options)
            runner = _Runner(spec, engine, self.heartbeat_s)
            # A compiled model compiles again for every new input shape, the batch size
            # included: warm each batch size it may see, not only single frames.
            for batch in range(1, runner.max_batch + 1) if engine.compiled else (1,):
                engine.warmup(spec.warmup_sizes, batch)
            runner.thread.start()
            self._runners[spec.name] = runner
            if spec.demo:
                logger.warning("DEMO model=%s has random weights: its depth values mean nothing", spec.name)
            logger.info("ready model=%s (%d/%d)", spec.name, position, total)
            if on_ready:
                on_ready(spec.name)

    def load_in_background(
        self,
        progress: Progress | None = None,
        on_ready: Callable[[str], None] | None = None,
        on_done: Callable[[BaseException | None], None] | None = None,
    ) -> threading.Thread:
        """`load` on a thread of its own, so the server can answer health checks meanwhile."""

        def run() -> None:
            try:
                self.load(progress, on_ready)
            except BaseException as error:  # reported to the caller, who decides to exit
                if on_done:
                    on_done(error)
                return
            if on_done:
                on_done(None)

        thread = threading.Thread(target=run, name="depthd-loader", daemon=True)
        thread.start()
        return thread

    @property
    def ready(self) -> bool:
        return len(self._runners) == len(self.specs)

    def is_ready(self, name: str) -> bool:
        return name in self._runners

    def engine(self, name: str = "") -> DepthEngine:
        """The engine serving `name` ("" for the default model)."""
        return self._runner(name).engine

    # --- serving ---------------------------------------------------------------------------

    def submit(
        self,
        model: str,
        source: ImageSource,
        spec: OutputSpec,
        deadline: float | None = None,
        lane: Lane | None = None,
        latest_wins: bool = False,
    ) -> "Future[PoolResult]":
        """Queue one frame for `model` ("" = default) from `lane` (a stream; None: a lane of its own).

        Errors known up front raise here; later ones (a bad image, a failed forward)
        come through the future. With `latest_wins`, the lane's frames still waiting
        for this model resolve at once as dropped.
        """
        runner = self._runner(model)
        runner.engine.check_output(spec)
        request = _Request(source, spec, Future(), time.monotonic(), deadline, lane)
        if lane is None:
            request.lane = request
        runner.admit(request, latest_wins)
        try:
            self._decoder.submit(self._prepare_and_queue, runner, request)
        except RuntimeError as error:  # the executor is shut down
            runner.abandon(request)
            raise Unavailable("the daemon is shutting down") from error
        return request.future

    def _prepare_and_queue(self, runner: _Runner, request: _Request) -> None:
        """Decode (and on CUDA pre-process) on a decode thread, overlapping the model's current forward pass."""
        if request.dropped or request.future.cancelled():
            runner.abandon(request)
            return
        try:
            request.frame = decode(request.source, self.limits)
            request.processed = runner.engine.processed_size(request.frame)
            if runner.engine.prepares_concurrently:
                request.prepared = runner.engine.prepare([request.frame])[0]
        except Exception as error:
            runner.abandon(request)
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(error)
            return
        runner.put(request)

    def models(self) -> list[ModelStatus]:
        statuses = []
        for spec in self.specs:
            runner = self._runners.get(spec.name)
            status = ModelStatus(spec.name, spec.source, spec.name == self.default, runner is not None, spec.demo)
            if runner is not None:
                engine = runner.engine
                status = dataclasses.replace(
                    status,
                    architecture=engine.checkpoint.architecture.model_type,
                    kind=engine.kind,
                    device=str(engine.device),
                    dtype=str(engine.dtype).removeprefix("torch."),
                    frames_total=runner.frames_total,
                    frames_dropped=runner.frames_dropped,
                    batch_sizes=dict(runner.batch_sizes),
                    queue_peak=runner.queue_peak,
                    max_batch=runner.max_batch,
                )
            statuses.append(status)
        return statuses

    def stalled(self, within: float) -> list[str]:
        """Models whose worker has shown no progress for `within` seconds: hung in a forward pass."""
        oldest = time.monotonic() - within
        return [name for name, runner in self._runners.items() if runner.heartbeat < oldest]

    def close(self, timeout: float | None = None) -> None:
        """Refuse new frames, let queued ones finish, and stop the workers, waiting at most
        `timeout` seconds in all (a worker hung in a forward pass is left behind)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._closed = True
        self._decoder.shutdown(wait=True)
        for runner in self._runners.values():
            runner.close()
        for runner in self._runners.values():
            runner.thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _runner(self, name: str) -> _Runner:
        name = name or self.default
        runner = self._runners.get(name)
        if runner is not None:
            return runner
        if self._closed:
            raise Unavailable("the daemon is shutting down")
        if any(s.name == name for s in self.specs):
            raise Unavailable(f"model {name!r} is still loading")
        raise NotFound(f"model {name!r} is not served; served: {', '.join(s.name for s in self.specs)}")
