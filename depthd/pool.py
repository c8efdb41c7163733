"""The warm model pool: the only place with threads and queues.

It loads and warms every configured model, then runs one worker per model. A frame
submitted to the pool is decoded (and, on CUDA, pre-processed) on a decode thread
while the model runs the batch before, queued in its stream's lane, and picked up by the
model's batcher, which gathers frames of one processed size, round-robin across
lanes, up to `max_batch` before a `time.monotonic()` deadline, runs them in one
forward pass and hands each caller its result through a `concurrent.futures.Future`.

Every frame is bounded twice: in count (`max_queue`) and in bytes. Its bytes (the
request, the decoded pixels, the input tensor, the reply) are held against its model's
`max_queue_bytes` and the daemon's `limits.max_pending_bytes` from the moment it is
submitted until its reply has been handed to the transport, and the reply's size is
checked against `limits.max_message_bytes` as soon as the image's header is read,
before any pixel is decoded.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from depthd.config import Limits
from depthd.domain import DepthKind, DepthResult, Frame, OutputSpec
from depthd.engine import DEFAULT_WARMUP_SIZES, DepthEngine, EngineOptions, Prepared, cpu_threads, set_torch_threads
from depthd.errors import DeadlineExceeded, DepthdError, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from depthd.frames import ImageSource, Raw, decode, encode_png

logger = logging.getLogger(__name__)

MIB = 1024 * 1024


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
    max_queue_bytes: int = 512 * MIB
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
    max_processed_side: int = 0
    max_queue_bytes: int = 0
    bytes_held: int = 0
    """Bytes this model's frames hold in the daemon now (requests, pixels, replies not yet sent)."""
    bytes_peak: int = 0
    queue_depth: int = 0
    """Frames waiting now: decoding, or ready for a forward pass."""


class ByteBudget:
    """Bytes held by frames, counted against a limit and against a parent's (the daemon's total).

    Thread-safe: frames take bytes on the event loop and the decode threads, and give
    them back on the model's worker and the event loop. A child's lock is always taken
    before its parent's, so two budgets never wait on each other.
    """

    def __init__(self, limit: int, setting: str, parent: "ByteBudget | None" = None):
        self.limit = limit
        self.setting = setting
        self.parent = parent
        self.held = 0
        self.peak = 0
        self._lock = threading.Lock()

    def take(self, count: int, what: str) -> None:
        with self._lock:
            if self.held + count > self.limit:
                raise ResourceExhausted(
                    f"{what} needs {_mib(count)} more, and {_mib(self.held)} of the {_mib(self.limit)} "
                    f"{self.setting} allows are held by frames and replies in the daemon; retry shortly"
                )
            if self.parent is not None:
                self.parent.take(count, what)
            self.held += count
            self.peak = max(self.peak, self.held)

    def give(self, count: int) -> None:
        with self._lock:
            self.held -= count
        if self.parent is not None:
            self.parent.give(count)


class Hold:
    """One frame's bytes in a budget: grown as the frame is received and decoded, shrunk to its
    reply after the forward pass, and given back, once, when the reply is sent or the frame ends."""

    def __init__(self, budget: ByteBudget):
        self._budget = budget
        self._bytes = 0
        self._lock = threading.Lock()

    def grow(self, count: int, what: str) -> None:
        with self._lock:
            self._budget.take(count, what)
            self._bytes += count

    def shrink_to(self, count: int) -> None:
        with self._lock:
            freed = max(0, self._bytes - count)
            self._bytes -= freed
        if freed:
            self._budget.give(freed)

    def release(self) -> None:
        self.shrink_to(0)


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


@dataclass(eq=False)
class _Request:
    source: ImageSource | None
    """The request's image; let go once decoded, or dropped."""
    spec: OutputSpec
    future: Future
    arrived: float
    deadline: float | None
    lane: object
    hold: Hold
    frame: Frame | None = None
    processed: tuple[int, int] | None = None
    """The size the model sees this frame at: only frames of one size share a batch."""
    prepared: Prepared | None = None
    dropped: bool = False
    kept_bytes: int = 0
    """What the frame holds once decoded: its pixels, its input tensor on the device and its reply."""

    def start(self) -> bool:
        """Move the future to running, unless it was cancelled or already answered (dropped, aborted).
        Only ever called with the runner's condition held, so no two threads race on it."""
        return not self.future.done() and self.future.set_running_or_notify_cancel()


Progress = Callable[[str, int, int], None]


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


class _Runner:
    """One model's queue and batching worker.

    A request is *waiting* from `admit` until the batcher takes it: first decoding and
    pre-processing on a decode thread, then in its lane's queue. `heartbeat` is the
    last time the worker loop showed progress: after each batch, and every
    `heartbeat_s` while idle. A forward pass that hangs stops it.
    """

    def __init__(self, spec: ModelSpec, engine: DepthEngine, heartbeat_s: float, budget: ByteBudget):
        self.spec = spec
        self.engine = engine
        self.max_batch = spec.max_batch or engine.default_max_batch
        self.heartbeat_s = heartbeat_s
        self.heartbeat = time.monotonic()
        self.budget = budget
        self.warmup_s = 0.0
        """The longest warm-up forward pass: what a frame costs this model, give or take."""
        self.condition = threading.Condition()
        self.closing = False
        self.waiting: dict[object, list[_Request]] = {}
        """Per lane, its waiting requests, in submission order."""
        self.lanes: dict[object, collections.deque[_Request]] = {}
        """Per lane, its requests ready for a batch; dict order is the round-robin order. A lane
        whose ready frame was replaced keeps its entry, empty, while the newer frame decodes."""
        self.running: list[_Request] = []
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
            older = list(self.waiting.get(request.lane, [])) if latest_wins else []
            if self.pending - len(older) >= self.spec.max_queue:
                raise ResourceExhausted(
                    f"model {self.spec.name!r} has {self.pending} frames waiting, its limit (max_queue)"
                )
            self.pending += 1
            self.queue_peak = max(self.queue_peak, self.pending)
            self.waiting.setdefault(request.lane, []).append(request)
            for waiting in older:
                self._drop(waiting)

    def fail(self, request: _Request, error: BaseException | None) -> None:
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

    def abort(self, error: BaseException) -> int:
        """Fail every frame still waiting or in a forward pass with `error` (shutdown's last step)."""
        with self.condition:
            requests = [r for lane in self.waiting.values() for r in lane] + self.running
            failing = [r for r in requests if r.future.running() or r.start()]
        for request in requests:
            request.hold.release()
        return sum(_settle(request.future, error=error) for request in failing)

    def _drop(self, request: _Request) -> None:
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
            _settle(request.future, PoolResult(None, self.spec.name, waited, waited))

    def _forget(self, request: _Request) -> None:
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

    def _take(self) -> list[_Request]:
        """Up to max_batch ready frames of one processed size: the size of the oldest ready frame,
        then one frame per lane per round, lanes served last going last."""
        oldest = min((queue[0] for queue in self.lanes.values() if queue), key=lambda r: r.arrived)
        size = oldest.processed
        batch: list[_Request] = []
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
            batch[0].hold.release()
            _settle(batch[0].future, error=error)
            return
        self.batch_sizes[len(batch)] += 1
        self.frames_total += len(batch)
        done = self.heartbeat = time.monotonic()
        for request, result in zip(batch, results):
            png = encode_png(result.visualization) if result.visualization is not None else None
            request.source = request.frame = request.prepared = None
            request.hold.shrink_to(result.depth.nbytes + len(png or b""))
            answered = _settle(
                request.future,
                PoolResult(
                    result=result,
                    model=self.spec.name,
                    queue_ms=(started - request.arrived) * 1000,
                    total_ms=(done - request.arrived) * 1000,
                    visualization_png=png,
                    hold=request.hold,
                ),
            )
            if not answered:
                request.hold.release()


class ModelPool:
    def __init__(
        self,
        specs: list[ModelSpec],
        default: str | None = None,
        limits: Limits | None = None,
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
        self.limits = limits = limits or Limits()
        self.heartbeat_s = heartbeat_s
        self.budget = ByteBudget(limits.max_pending_bytes, "limits.max_pending_bytes")
        self._runners: dict[str, _Runner] = {}
        """Replaced, never changed in place: the loader adds runners while others read it."""
        self._decoder = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="depthd-decode")
        if torch_threads:
            set_torch_threads(torch_threads)
        self._closed = False

    # --- loading ---------------------------------------------------------------------------

    def load(self, progress: Progress | None = None, on_ready: Callable[[str], None] | None = None) -> None:
        """Load, warm and start every model in order; raises ModelLoadError on the first that fails."""
        logger.info("cpu threads: torch=%d OMP_WAIT_POLICY=%s", cpu_threads(), os.environ.get("OMP_WAIT_POLICY", "unset"))
        total = len(self.specs)
        for position, spec in enumerate(self.specs, start=1):
            if self._closed:
                return
            if progress:
                progress(spec.name, position, total)
            engine = DepthEngine.load(spec.name, spec.source, spec.options)
            budget = ByteBudget(spec.max_queue_bytes, f"model {spec.name!r}'s max_queue_bytes", self.budget)
            runner = _Runner(spec, engine, self.heartbeat_s, budget)
            # A compiled model compiles again for every new input shape, the batch size
            # included: warm each batch size it may see, not only single frames.
            for batch in range(1, runner.max_batch + 1) if engine.compiled else (1,):
                started = time.monotonic()
                engine.warmup(spec.warmup_sizes, batch)
                runner.warmup_s = max(runner.warmup_s, (time.monotonic() - started) / max(1, len(spec.warmup_sizes)))
            runner.thread.start()
            self._runners = {**self._runners, spec.name: runner}
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

    def engine(self, name: str = "") -> DepthEngine:
        """The engine serving `name` ("" for the default model)."""
        return self._runner(name).engine

    def resolve(self, name: str) -> str:
        """The name of the model a request naming `name` gets ("" is the default)."""
        return name or self.default

    def warmup_seconds(self) -> dict[str, float]:
        """Per ready model, its longest warm-up forward pass in seconds."""
        return {name: runner.warmup_s for name, runner in self._runners.items()}

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

        Errors known up front raise here; later ones (a bad image, an output over the
        limits, a failed forward) come through the future. With `latest_wins`, the lane's
        frames still waiting for this model resolve at once as dropped.
        """
        runner = self._runner(model)
        runner.engine.check_output(spec)
        hold = Hold(runner.budget)
        hold.grow(len(source.data), "this frame's request")
        request = _Request(source, spec, Future(), time.monotonic(), deadline, lane, hold)
        if lane is None:
            request.lane = request
        try:
            runner.admit(request, latest_wins)
            self._decoder.submit(self._prepare_and_queue, runner, request)
        except RuntimeError as error:  # the executor is shut down
            runner.fail(request, None)
            raise Unavailable("the daemon is shutting down") from error
        except DepthdError:
            hold.release()
            raise
        return request.future

    def _prepare_and_queue(self, runner: _Runner, request: _Request) -> None:
        """Decode (and on CUDA pre-process) on a decode thread, overlapping the model's current forward pass."""
        source = request.source
        if request.dropped or source is None or request.future.done():
            runner.fail(request, None)
            return
        try:
            request.frame = decode(source, self.limits.max_input_pixels, lambda w, h, b: self._admit(runner, request, w, h, b))
            if not isinstance(source, Raw):
                request.hold.shrink_to(request.frame.pixels.nbytes + request.kept_bytes)
            request.source = None
            request.processed = runner.engine.processed_size(request.frame.height, request.frame.width)
            if runner.engine.prepares_concurrently:
                request.prepared = runner.engine.prepare([request.frame])[0]
        except Exception as error:
            runner.fail(request, error)
            return
        runner.put(request)

    def _admit(self, runner: _Runner, request: _Request, width: int, height: int, decoded_bytes: int) -> None:
        """The image's size is known, its pixels not yet decoded: refuse what the reply or the
        memory budget cannot take, before any work."""
        spec = request.spec
        out_height, out_width = spec.size_for(height, width)
        side = self.limits.max_output_side
        if max(out_height, out_width) > side:
            asked = "as asked" if spec.width or spec.height else "the input's size"
            raise InvalidArgument(
                f"output: the depth map would be {out_width}x{out_height} ({asked}), over the limit of {side} a side "
                f"(limits.max_output_side); ask for a smaller output.width or output.height"
            )
        reply = spec.reply_bytes(out_height, out_width)
        if reply > self.limits.max_message_bytes:
            raise ResourceExhausted(
                f"output: a {out_width}x{out_height} {spec.encoding.name} map"
                f"{' with its visualization' if spec.visualization else ''} is up to {reply} bytes, over the "
                f"{self.limits.max_message_bytes} of limits.max_message_bytes; ask for a smaller output.width/height, "
                "FLOAT16, or no visualization"
            )
        tensor = runner.engine.input_bytes(height, width) if runner.engine.prepares_concurrently else 0
        request.hold.grow(decoded_bytes + reply + tensor, f"a {width}x{height} frame")
        request.kept_bytes = reply + tensor

    def models(self) -> list[ModelStatus]:
        statuses = []
        for spec in self.specs:
            runner = self._runners.get(spec.name)
            status = ModelStatus(spec.name, spec.source, spec.name == self.default, runner is not None, spec.demo,
                                 max_queue_bytes=spec.max_queue_bytes)
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
                    max_processed_side=engine.max_processed_side,
                    bytes_held=runner.budget.held,
                    bytes_peak=runner.budget.peak,
                    queue_depth=runner.pending,
                )
            statuses.append(status)
        return statuses

    def stalled(self, within: float) -> list[str]:
        """Models whose worker has shown no progress for `within` seconds: hung in a forward pass."""
        oldest = time.monotonic() - within
        return [name for name, runner in self._runners.items() if runner.heartbeat < oldest]

    def abort(self, error: BaseException) -> int:
        """Fail every frame not yet answered with `error`; the number failed."""
        return sum(runner.abort(error) for runner in self._runners.values())

    def close(self, timeout: float | None = None) -> list[str]:
        """Refuse new frames, let queued ones finish, and stop the workers, waiting at most
        `timeout` seconds in all. Returns the models whose worker is still in a forward pass."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._closed = True
        self._decoder.shutdown(wait=True)
        runners = self._runners.values()
        for runner in runners:
            runner.close()
        for runner in runners:
            runner.thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return [runner.spec.name for runner in runners if runner.thread.is_alive()]

    def _runner(self, name: str) -> _Runner:
        name = self.resolve(name)
        runner = self._runners.get(name)
        if runner is not None:
            return runner
        if self._closed:
            raise Unavailable("the daemon is shutting down")
        if any(s.name == name for s in self.specs):
            raise Unavailable(f"model {name!r} is still loading")
        raise NotFound(f"model {name!r} is not served; served: {', '.join(s.name for s in self.specs)}")


def _mib(count: int) -> str:
    return f"{count / MIB:.1f} MiB"
