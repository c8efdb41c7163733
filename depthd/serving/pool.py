"""The warm model pool: it loads and warms every configured model, runs a batcher for each, and
takes frames in.

Every frame is bounded twice: in count (`max_queue`) and in bytes. Its bytes (the
request, the decoded pixels, the input tensor, the reply) are held against its model's
`max_queue_bytes` and the daemon's `limits.max_pending_bytes` from the moment it is
submitted until its reply has been handed to the transport, and the reply's size is
checked against `limits.max_message_bytes` as soon as the image's header is read,
before any pixel is decoded. Decoding, and finishing results (their visualization
PNG), run on the pool's executor, so that the batchers' workers do nothing but forward passes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from depthd.config import Settings
from depthd.domain import DepthKind, Geometry, OutputSpec
from depthd.engine.engine import NO_GEOMETRY, DepthEngine, cpu_threads, set_torch_threads
from depthd.errors import DepthdError, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from depthd.serving.batcher import Batcher, Job, Lane, PoolResult
from depthd.serving.budget import ByteBudget, Hold
from depthd.serving.frames import ImageSource, RawImage, decode

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


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
    backend: str = ""
    input_size: int = 0
    """The processed short side at the model's configured size; 0: frames are processed at their own."""
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
    queue_ready: int = 0
    """Of those, the frames decoded and ready for a forward pass."""


class ModelPool:
    """Every configured model, loaded and warmed in order, each with its batcher."""

    def __init__(self, settings: Settings, heartbeat_s: float = 1.0):
        if not settings.models:
            raise ValueError("a pool needs at least one model")
        self.settings = settings
        self.models_settings = [settings.resolved(model) for model in settings.models]
        self.default = settings.default
        self.limits = settings.limits
        self.heartbeat_s = heartbeat_s
        self.budget = ByteBudget(self.limits.max_pending_bytes, "limits.max_pending_bytes")
        self._batchers: dict[str, Batcher] = {}
        """Replaced, never changed in place: the loader adds batchers while others read it."""
        self._executor = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="depthd-decode")
        if settings.torch_threads:
            set_torch_threads(settings.torch_threads)
        self._closed = False

    @property
    def names(self) -> list[str]:
        return [model.name for model in self.models_settings]

    # --- loading ---------------------------------------------------------------------------

    def load(self, progress: Progress | None = None, on_ready: Callable[[str], None] | None = None) -> None:
        """Load, warm and start every model in order; raises ModelLoadError on the first that fails."""
        logger.info("cpu threads: torch=%d OMP_WAIT_POLICY=%s", cpu_threads(), os.environ.get("OMP_WAIT_POLICY", "unset"))
        total = len(self.models_settings)
        for position, model in enumerate(self.models_settings, start=1):
            if self._closed:
                return
            if progress:
                progress(model.name, position, total)
            engine = DepthEngine.load(model)
            budget = ByteBudget(model.max_queue_bytes, f"model {model.name!r}'s max_queue_bytes", self.budget)
            batcher = Batcher(model, engine, self.heartbeat_s, budget, self._executor)
            # A compiled model compiles again for every new input shape, the batch size
            # included: warm each batch size it may see, not only single frames.
            for batch in range(1, batcher.max_batch + 1) if engine.compiled else (1,):
                started = time.monotonic()
                engine.warmup(model.warmup_sizes, batch)
                batcher.warmup_s = max(batcher.warmup_s, (time.monotonic() - started) / max(1, len(model.warmup_sizes)))
            batcher.thread.start()
            self._batchers = {**self._batchers, model.name: batcher}
            if model.demo:
                logger.warning("DEMO model=%s has random weights: its depth values mean nothing", model.name)
            logger.info("ready model=%s (%d/%d)", model.name, position, total)
            if on_ready:
                on_ready(model.name)

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
        return len(self._batchers) == len(self.models_settings)

    def engine(self, name: str = "") -> DepthEngine:
        """The engine serving `name` ("" for the default model)."""
        return self._batcher(name).engine

    def resolve(self, name: str) -> str:
        """The name of the model a request naming `name` gets ("" is the default)."""
        return name or self.default

    def warmup_seconds(self) -> dict[str, float]:
        """Per ready model, its longest warm-up forward pass in seconds."""
        return {name: batcher.warmup_s for name, batcher in self._batchers.items()}

    # --- serving ---------------------------------------------------------------------------

    def submit(
        self,
        model: str,
        source: ImageSource,
        output: OutputSpec,
        deadline: float | None = None,
        lane: Lane | None = None,
        latest_wins: bool = False,
        geometry: Geometry = NO_GEOMETRY,
    ) -> "Future[PoolResult]":
        """Queue one frame for `model` ("" = default) from `lane` (a stream; None: a lane of its own).

        Errors known up front raise here; later ones (a bad image, an output over the
        limits, a failed forward) come through the future. With `latest_wins`, the lane's
        frames still waiting for this model resolve at once as dropped.
        """
        batcher = self._batcher(model)
        batcher.engine.check_output(output, geometry)
        hold = Hold(batcher.budget)
        hold.grow(len(source.data), "this frame's request")
        job = Job(source, output, Future(), time.monotonic(), deadline, lane, hold, geometry)
        if lane is None:
            job.lane = job
        try:
            batcher.admit(job, latest_wins)
            self._executor.submit(self._prepare_and_queue, batcher, job)
        except RuntimeError as error:  # the executor is shut down
            batcher.fail(job, None)
            raise Unavailable("the daemon is shutting down") from error
        except DepthdError:
            hold.release()
            raise
        return job.future

    def _prepare_and_queue(self, batcher: Batcher, job: Job) -> None:
        """Decode (and on CUDA pre-process) on the executor, overlapping the model's current forward pass."""
        source = job.source
        if job.dropped or source is None or job.future.done():
            batcher.fail(job, None)
            return
        try:
            job.frame = decode(source, self.limits.max_input_pixels, lambda w, h, b: self._admit(batcher, job, w, h, b))
            if not isinstance(source, RawImage):
                job.hold.shrink_to(job.frame.pixels.nbytes + job.kept_bytes)
            job.source = None
            job.processed = batcher.engine.processed_size(job.frame.height, job.frame.width)
            if batcher.engine.prepares_concurrently:
                job.prepared = batcher.engine.prepare([job.frame], [job.output.point_cloud_rgb])[0]
        except Exception as error:
            batcher.fail(job, error)
            return
        batcher.put(job)

    def _admit(self, batcher: Batcher, job: Job, width: int, height: int, decoded_bytes: int) -> None:
        """The image's size is known, its pixels not yet decoded: refuse what the reply or the
        memory budget cannot take, before any work."""
        output = job.output
        out_height, out_width = output.size_for(height, width)
        side = self.limits.max_output_side
        if max(out_height, out_width) > side:
            asked = "as asked" if output.width or output.height else "the input's size"
            raise InvalidArgument(
                f"output: the depth map would be {out_width}x{out_height} ({asked}), over the limit of {side} a side "
                f"(limits.max_output_side); ask for a smaller output.width or output.height"
            )
        rows, columns = output.points_grid(out_height, out_width)
        if output.point_cloud and (output.point_stride > out_height or output.point_stride > out_width):
            raise InvalidArgument(
                f"output.point_stride: {output.point_stride} is larger than the {out_width}x{out_height} map: "
                f"at most {min(out_height, out_width)}"
            )
        reply = output.reply_bytes(out_height, out_width)
        limit = self.limits.max_message_bytes
        if reply > limit and output.point_cloud:
            raise ResourceExhausted(
                f"output.point_stride: a {columns}x{rows} point cloud (stride {output.point_stride}) makes the reply "
                f"up to {reply} bytes, over the {limit} of limits.max_message_bytes; ask for a point_stride of "
                f"{_stride_that_fits(output, out_height, out_width, limit)} or more, or a smaller output.width/height"
            )
        if reply > self.limits.max_message_bytes:
            raise ResourceExhausted(
                f"output: a {out_width}x{out_height} {output.encoding.name} map"
                f"{' with its visualization' if output.visualization else ''} is up to {reply} bytes, over the "
                f"{self.limits.max_message_bytes} of limits.max_message_bytes; ask for a smaller output.width/height, "
                "FLOAT16, or no visualization"
            )
        tensor = batcher.engine.input_bytes(height, width) if batcher.engine.prepares_concurrently else 0
        job.hold.grow(decoded_bytes + reply + tensor, f"a {width}x{height} frame")
        job.kept_bytes = reply + tensor

    def models(self) -> list[ModelStatus]:
        statuses = []
        for model in self.models_settings:
            batcher = self._batchers.get(model.name)
            status = ModelStatus(model.name, model.source, model.name == self.default, batcher is not None, model.demo,
                                 max_queue_bytes=model.max_queue_bytes)
            if batcher is not None:
                engine = batcher.engine
                status = dataclasses.replace(
                    status,
                    architecture=engine.checkpoint.architecture.model_type,
                    kind=engine.kind,
                    device=str(engine.device),
                    dtype=str(engine.dtype).removeprefix("torch."),
                    backend=engine.backend,
                    input_size=engine.input_size,
                    frames_total=batcher.frames_total,
                    frames_dropped=batcher.frames_dropped,
                    batch_sizes=dict(batcher.batch_sizes),
                    queue_peak=batcher.queue_peak,
                    max_batch=batcher.max_batch,
                    max_processed_side=engine.max_processed_side,
                    bytes_held=batcher.budget.held,
                    bytes_peak=batcher.budget.peak,
                    queue_depth=batcher.pending,
                    queue_ready=batcher.ready,
                )
            statuses.append(status)
        return statuses

    def stalled(self, within: float) -> list[str]:
        """Models whose worker has shown no progress for `within` seconds: hung in a forward pass."""
        oldest = time.monotonic() - within
        return [name for name, batcher in self._batchers.items() if batcher.heartbeat < oldest]

    def abort(self, error: BaseException) -> int:
        """Fail every frame not yet answered with `error`; the number failed."""
        return sum(batcher.abort(error) for batcher in self._batchers.values())

    def close(self, timeout: float | None = None) -> list[str]:
        """Refuse new frames, let queued ones finish, and stop the workers, waiting at most
        `timeout` seconds in all. Returns the models whose worker is still in a forward pass."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._closed = True
        batchers = self._batchers.values()
        for batcher in batchers:
            batcher.close()
        for batcher in batchers:
            batcher.thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._executor.shutdown(wait=True)
        return [batcher.settings.name for batcher in batchers if batcher.thread.is_alive()]

    def _batcher(self, name: str) -> Batcher:
        name = self.resolve(name)
        batcher = self._batchers.get(name)
        if batcher is not None:
            return batcher
        if self._closed:
            raise Unavailable("the daemon is shutting down")
        if name in self.names:
            raise Unavailable(f"model {name!r} is still loading")
        raise NotFound(f"model {name!r} is not served; served: {', '.join(self.names)}")


def _stride_that_fits(output: OutputSpec, height: int, width: int, limit: int) -> int:
    """The smallest point_stride whose reply fits in `limit` bytes (the map alone may not)."""
    for stride in range(max(2, output.point_stride + 1), max(height, width) + 1):
        if dataclasses.replace(output, point_stride=stride).reply_bytes(height, width) <= limit:
            return stride
    return max(height, width)
