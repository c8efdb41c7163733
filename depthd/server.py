"""Build the gRPC server (`create_server`) and run the daemon's life (`serve`).

`create_server` binds the listen addresses and registers the services without
starting anything. `serve` starts the server first, so health checks are answered
(NOT_SERVING) while the models load; it marks each model SERVING as it becomes warm,
and the whole daemon once all are.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from depthd.config import Limits, Settings
from depthd.engine import EngineOptions
from depthd import descriptors
from depthd.errors import DepthdError, Unavailable
from depthd.pool import ModelPool, ModelSpec
from depthd.service import DepthEstimatorService
from depthd.systemd import Notifier
from depthd_client.v1 import depth_pb2, depth_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = depth_pb2.DESCRIPTOR.services_by_name["DepthEstimator"].full_name
MAX_STREAMS_PER_CONNECTION = 100
"""Concurrent calls on one connection (a robot's cameras share one): gRPC's default is unlimited."""
STALL_FRACTION = 1 / 3
"""A worker without progress for this share of WatchdogSec is judged hung, and the pings stop."""
WORST_FRAME_FACTOR = 3
"""What the largest legal frame may cost against a warm-up frame, under the processed-size cap."""
LAST_ANSWERS_S = 1.0
"""After the drain's grace: time for the last answers (UNAVAILABLE ones included) to go out."""
WORKER_JOIN_S = 0.5
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def server_options(limits: Limits) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments, each a limit that no client can push past."""
    return [
        # a request carries one frame: refuse larger ones (RESOURCE_EXHAUSTED) before reading them
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        # a reply is checked against the same figure before any work; this only backs that up
        ("grpc.max_send_message_length", limits.max_message_bytes),
        # HTTP/2 flow control is what holds a sender once a stream's window of frames is full:
        # keep each stream's window fixed and small (BDP probing would grow it to megabytes,
        # hundreds of small frames, all of them stale by the time they are read)
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", limits.transport_window_bytes),
        # calls one connection may have open at once; more wait in the client
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        # close connections with no call for a while: idle sockets cost file descriptors
        ("grpc.max_connection_idle_ms", int(limits.max_connection_idle_s * 1000)),
        # ping idle connections so a robot that lost power frees its streams
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # accept clients' own keepalive pings down to every 10 s, even between calls; a client
        # that pings more often is sent GOAWAY after max_ping_strikes bad pings
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_ping_strikes", 2),
        # a second daemon on the same port must fail to bind, not share the port
        ("grpc.so_reuseport", 0),
    ]


def model_health_name(model: str) -> str:
    return f"{SERVICE_NAME}/{model}"


def pool_from_settings(settings: Settings, heartbeat_s: float = 1.0) -> ModelPool:
    specs = [
        ModelSpec(
            name=m.name,
            source=m.source,
            options=EngineOptions(
                device=settings.device_for(m),
                dtype=settings.dtype_for(m),
                flip_augmentation=m.flip_augmentation,
                attention=m.attention,
                channels_last=m.channels_last,
                compile=m.compile,
                cuda_graphs=m.cuda_graphs,
                max_processed_side=m.max_processed_side,
            ),
            warmup_sizes=m.warmup_sizes,
            max_batch=m.max_batch,
            max_wait_ms=m.max_wait_ms,
            max_queue=m.max_queue,
            max_queue_bytes=m.max_queue_bytes,
            demo=m.demo,
        )
        for m in settings.models
    ]
    return ModelPool(
        specs,
        default=settings.default,
        limits=settings.limits,
        decode_threads=settings.decode_threads,
        torch_threads=settings.torch_threads,
        heartbeat_s=heartbeat_s,
    )


@dataclass
class Daemon:
    """A built, not yet started server, and what `serve` needs to drive it."""

    server: grpc.aio.Server
    health: health_aio.HealthServicer
    service: DepthEstimatorService
    pool: ModelPool
    addresses: list[str]
    """The bound addresses, with the real port where 0 was asked for."""

    async def set_health(self, status: int, *names: str) -> None:
        for name in names:
            await self.health.set(name, status)

    async def mark_ready(self, model: str) -> None:
        await self.set_health(SERVING, model_health_name(model))
        if self.pool.ready:
            await self.set_health(SERVING, "", SERVICE_NAME)


async def create_server(settings: Settings, pool: ModelPool) -> Daemon:
    """Bind and register; start nothing. Health is NOT_SERVING for everything until `mark_ready`."""
    server = grpc.aio.server(
        options=server_options(settings.limits), maximum_concurrent_rpcs=settings.limits.max_concurrent_rpcs
    )
    service = DepthEstimatorService(pool, settings.limits)
    depth_pb2_grpc.add_DepthEstimatorServicer_to_server(service, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    daemon = Daemon(server, health, service, pool, [])
    await daemon.set_health(NOT_SERVING, "", SERVICE_NAME, *(model_health_name(s.name) for s in pool.specs))
    for address in settings.listen:
        port = server.add_insecure_port(address)
        if address.startswith("unix:"):
            # as reachable as the loopback port: any local user may connect (the directory decides)
            os.chmod(address[len("unix:"):], 0o666)
            daemon.addresses.append(address)
        else:
            daemon.addresses.append(f"{address.rpartition(':')[0]}:{port}")
    return daemon


@dataclass(frozen=True)
class Exit:
    """How the daemon ended: the process's exit code, and the model workers it had to leave
    behind in a forward pass (the process must then end without running C++ destructors)."""

    code: int
    workers_left: tuple[str, ...] = ()


class DepthDaemon:
    """The daemon's life: serve at once, load in the background, tell systemd, drain on stop."""

    def __init__(self, settings: Settings, pool: ModelPool | None = None, notifier: Notifier | None = None):
        self.settings = settings
        self.notifier = notifier or Notifier({})
        interval = self.notifier.watchdog_interval
        self.pool = pool or pool_from_settings(settings, heartbeat_s=min(1.0, interval / 4) if interval else 1.0)
        self.daemon: Daemon | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: BaseException | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> list[str]:
        """Bind, start the server (health NOT_SERVING) and begin loading; returns the bound addresses."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.daemon = await create_server(self.settings, self.pool)
        await self.daemon.server.start()
        logger.info("listening on %s", ", ".join(self.daemon.addresses))
        if self.notifier.watchdog_interval:
            self._tasks.append(asyncio.ensure_future(self._keep_watchdog(self.notifier.watchdog_interval)))
        self._tasks.append(asyncio.ensure_future(descriptors.watch()))
        self.pool.load_in_background(progress=self._loading, on_ready=self._model_ready, on_done=self._loading_done)
        return self.daemon.addresses

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the daemon runs on, once started."""
        return self._loop

    def request_stop(self) -> None:
        """Ask the daemon to drain and stop; safe from any thread or a signal handler, and after it stopped."""
        loop = self._loop
        if loop is None or self._stop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._stop.set)
        except RuntimeError:  # the loop closed between the check and the call: it has stopped
            pass

    async def wait(self) -> Exit:
        """Serve until asked to stop (or a model fails to load), then drain: every frame received is
        answered within `drain_grace_s` (with UNAVAILABLE if its forward pass runs past it)."""
        await self._stop.wait()
        grace = self.settings.drain_grace_s
        if isinstance(self._failure, DepthdError):
            logger.error("%s", self._failure)
        elif self._failure is not None:
            logger.error("loading failed", exc_info=self._failure)
        else:
            logger.info("stopping: answering the frames received, for up to %.1f s", grace)
        await self._drain(grace)
        for task in self._tasks:
            task.cancel()
        left = tuple(await asyncio.to_thread(self.pool.close, WORKER_JOIN_S))
        if left:
            logger.warning("model worker %s still in a forward pass: exiting without it", ", ".join(left))
        logger.info("stopped")
        return Exit(1 if self._failure is not None else 0, left)

    async def _drain(self, grace: float) -> None:
        """Health NOT_SERVING, new calls UNAVAILABLE, calls in progress answered: then stop the server.

        The server keeps accepting connections meanwhile, so a late caller is told
        UNAVAILABLE (and a health check NOT_SERVING) rather than finding the port closed.
        Frames still unanswered when the grace is over are answered UNAVAILABLE.
        """
        self.notifier.stopping("draining")
        await self.daemon.health.enter_graceful_shutdown()
        service = self.daemon.service
        service.draining.set()
        if not await _within(service.calls.idle.wait(), grace):
            failed = self.pool.abort(Unavailable(
                f"the daemon is shutting down and this frame was not done within drain_grace_s ({grace:g} s)"
            ))
            logger.warning("%d call(s) still running after the %.1f s grace: %d frame(s) answered UNAVAILABLE",
                           service.calls.count, grace, failed)
            await _within(service.calls.idle.wait(), LAST_ANSWERS_S)
        await self.daemon.server.stop(LAST_ANSWERS_S)

    def _loading(self, name: str, position: int, total: int) -> None:
        logger.info("loading model=%s (%d/%d)", name, position, total)
        self.notifier.status(f"loading {name} ({position}/{total})")

    def _model_ready(self, name: str) -> None:
        asyncio.run_coroutine_threadsafe(self._mark_ready(name), self._loop)

    async def _mark_ready(self, name: str) -> None:
        await self.daemon.mark_ready(name)
        if self.pool.ready:
            names = ", ".join(s.name for s in self.pool.specs)
            self.notifier.ready(f"serving {names} on {', '.join(self.daemon.addresses)}")
            self._check_watchdog_margin()

    def _check_watchdog_margin(self) -> None:
        interval = self.notifier.watchdog_interval
        if not interval:
            return
        for name, seconds in self.pool.warmup_seconds().items():
            if seconds * WORST_FRAME_FACTOR > interval * STALL_FRACTION:
                logger.warning(
                    "model=%s took %.1f s a forward pass at warm-up, and a frame may cost %d times that: over the "
                    "%.1f s without progress after which the watchdog judges a worker hung (WatchdogSec=%g); raise "
                    "WatchdogSec to at least %.0f (`systemctl edit depthd`)",
                    name, seconds, WORST_FRAME_FACTOR, interval * STALL_FRACTION, interval,
                    seconds * WORST_FRAME_FACTOR / STALL_FRACTION + 1,
                )

    def _loading_done(self, error: BaseException | None) -> None:
        if error is not None:
            self._failure = error
            self.request_stop()

    async def _keep_watchdog(self, interval: float) -> None:
        """WATCHDOG=1 every `interval`/2, but only while every model worker has shown progress within
        `interval` * STALL_FRACTION: a forward pass that hangs stops the pings well before systemd's
        deadline, and systemd restarts the daemon."""
        withheld = False
        while True:
            await asyncio.sleep(interval / 2)
            try:
                stalled = self.pool.stalled(within=interval * STALL_FRACTION)
            except Exception:  # noqa: BLE001 - judging must never end the pings for good
                logger.exception("cannot tell whether the model workers make progress")
                continue
            if not stalled:
                self.notifier.watchdog()
                withheld = False
            elif not withheld:
                logger.error("model worker %s stuck for over %.1f s: withholding the watchdog ping",
                             ", ".join(stalled), interval * STALL_FRACTION)
                withheld = True


async def _within(awaitable, seconds: float) -> bool:
    """Await `awaitable` for at most `seconds`; whether it finished."""
    try:
        await asyncio.wait_for(awaitable, max(0.0, seconds))
    except asyncio.TimeoutError:
        return False
    return True


async def serve(settings: Settings) -> Exit:
    """Run the daemon until SIGTERM/SIGINT; a second signal exits at once."""
    descriptors.raise_soft_limit()
    daemon = DepthDaemon(settings, notifier=Notifier())
    loop = asyncio.get_running_loop()
    signalled: list[int] = []

    def on_signal(signum: int) -> None:
        if signalled:
            logger.warning("second signal (%s): exiting now, without draining", signal.Signals(signum).name)
            os._exit(128 + signum)
        signalled.append(signum)
        daemon.request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await daemon.start()
    except (OSError, RuntimeError) as error:
        logger.error("cannot start: %s", error)
        return Exit(1)
    return await daemon.wait()
