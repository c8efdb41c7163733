"""The warm model pool: the only place with threads and queues.

It loads and warms every configured model, then runs one worker per model. A frame
submitted to the pool is decoded on a decode thread, queued for its model, and picked
up by the model's batcher, which gathers frames from every stream and unary call up
to `max_batch` before a `time.monotonic()` deadline, runs them through the engine in
one call and hands each caller its result through a `concurrent.futures.Future`.
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

from depthd.domain import DepthKind, DepthResult, OutputSpec
from depthd.engine import DEFAULT_WARMUP_SIZES, DepthEngine, EngineOptions
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
    max_batch: int = 4
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


@dataclass(frozen=True)
class PoolResult:
    """A frame's depth, with the whole path's timing."""

    result: DepthResult
    model: str
    queue_ms: float
    total_ms: float
    visualization_png: bytes | None = None


@dataclass
class _Request:
    source: ImageSource
    spec: OutputSpec
    future: Future
    arrived: float
    deadline: float | None
    frame: object = None


Progress = Callable[[str, int, int], None]


class _Runner:
    """One model's queue and batching worker.

    `heartbeat` is the last time the worker loop showed progress: after each batch,
    and every `heartbeat_s` while idle. A forward pass that hangs stops it.
    """

    def __init__(self, spec: ModelSpec, engine: DepthEngine, heartbeat_s: float):
        self.spec = spec
        self.engine = engine
        self.heartbeat_s = heartbeat_s
        self.heartbeat = time.monotonic()
        self.queue: collections.deque[_Request] = collections.deque()
        self.pending = 0
        """Frames submitted and not yet taken into a batch (decoding or queued)."""
        self.condition = threading.Condition()
        self.closing = False
        self.frames_total = 0
        self.frames_dropped = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.thread = threading.Thread(target=self._run, name=f"depthd-model-{spec.name}", daemon=True)

    def reserve(self) -> None:
        with self.condition:
            if self.closing:
                raise Unavailable(f"model {self.spec.name!r} is shutting down")
            if self.pending >= self.spec.max_queue:
                raise ResourceExhausted(
                    f"model {self.spec.name!r} has {self.pending} frames waiting, its limit (max_queue)"
                )
            self.pending += 1

    def release(self) -> None:
        with self.condition:
            self.pending -= 1

    def put(self, request: _Request) -> None:
        with self.condition:
            self.queue.append(request)
            self.condition.notify()

    def close(self) -> None:
        with self.condition:
            self.closing = True
            self.condition.notify_all()

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
            while not self.queue:
                if self.closing:
                    return None
                self.condition.wait(self.heartbeat_s)
                self.heartbeat = time.monotonic()
            deadline = time.monotonic() + self.spec.max_wait_ms / 1000
            while len(self.queue) < self.spec.max_batch and not self.closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.condition.wait(left)
            batch = [self.queue.popleft() for _ in range(min(self.spec.max_batch, len(self.queue)))]
            self.pending -= len(batch)
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

    def _process(self, batch: list[_Request]) -> None:
        started = time.monotonic()
        try:
            results = self.engine.estimate([r.frame for r in batch], [r.spec for r in batch])
        except DepthdError as error:
            for request in batch:
                request.future.set_exception(error)
            return
        except Exception as error:  # a bad batch must not take the worker down
            logger.exception("forward pass failed model=%s batch=%d", self.spec.name, len(batch))
            for request in batch:
                request.future.set_exception(error)
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
            engine.warmup(spec.warmup_sizes)
            runner = _Runner(spec, engine, self.heartbeat_s)
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
        self, model: str, source: ImageSource, spec: OutputSpec, deadline: float | None = None
    ) -> "Future[PoolResult]":
        """Queue one frame for `model` ("" = default). Errors known up front raise here;
        later ones (a bad image, a failed forward) come through the future."""
        runner = self._runner(model)
        runner.engine.check_output(spec)
        runner.reserve()
        request = _Request(source, spec, Future(), time.monotonic(), deadline)
        try:
            self._decoder.submit(self._decode_and_queue, runner, request)
        except RuntimeError as error:  # the executor is shut down
            runner.release()
            raise Unavailable("the daemon is shutting down") from error
        return request.future

    def _decode_and_queue(self, runner: _Runner, request: _Request) -> None:
        if request.future.cancelled():
            runner.release()
            return
        try:
            request.frame = decode(request.source, self.limits)
        except Exception as error:
            runner.release()
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
                )
            statuses.append(status)
        return statuses

    def stalled(self, within: float) -> list[str]:
        """Models whose worker has shown no progress for `within` seconds: hung in a forward pass."""
        oldest = time.monotonic() - within
        return [name for name, runner in self._runners.items() if runner.heartbeat < oldest]

    def close(self, timeout: float | None = None) -> None:
        """Refuse new frames, let queued ones finish, and stop the workers."""
        self._closed = True
        self._decoder.shutdown(wait=True)
        for runner in self._runners.values():
            runner.close()
        for runner in self._runners.values():
            runner.thread.join(timeout)

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
