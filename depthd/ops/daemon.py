"""The daemon's life: serve at once, load the models in the background, tell systemd, drain on stop.

`Daemon.start` builds and starts the gRPC server first, so health checks are answered
(NOT_SERVING) while the models load; each model is marked SERVING as it becomes warm,
and systemd hears READY=1 once all are. On SIGTERM (`serve`) the server drains within
`drain_grace_s` and the process exits 0; a second signal exits at once. SIGHUP reads the
TLS files again. With `metrics_listen`, Prometheus metrics are served from start to stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass

from depthd.config import Settings
from depthd.errors import DepthdError
from depthd.ops import descriptors
from depthd.ops.metrics import Metrics
from depthd.ops.systemd import Notifier
from depthd.server.build import Server, create_server
from depthd.serving.pool import ModelPool

logger = logging.getLogger(__name__)

STALL_FRACTION = 1 / 3
"""A worker without progress for this share of WatchdogSec is judged hung, and the pings stop."""
WORST_FRAME_FACTOR = 3
"""What the largest legal frame may cost against a warm-up frame, under the processed-size cap."""
WORKER_JOIN_S = 0.5


@dataclass(frozen=True)
class Exit:
    """How the daemon ended: the process's exit code, and the model workers it had to leave
    behind in a forward pass (the process must then end without running C++ destructors)."""

    code: int
    workers_left: tuple[str, ...] = ()


class Daemon:
    """One depthd: its settings, its pool, its server, and its supervisor (systemd, when there is one)."""

    def __init__(self, settings: Settings, pool: ModelPool | None = None, notifier: Notifier | None = None):
        self.settings = settings
        self.notifier = notifier or Notifier({})
        interval = self.notifier.watchdog_interval
        self.pool = pool or ModelPool(settings, heartbeat_s=min(1.0, interval / 4) if interval else 1.0)
        self.server: Server | None = None
        self.metrics: Metrics | None = None
        """The /metrics endpoint and what it serves, once started with `metrics_listen` set."""
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: BaseException | None = None
        self._tasks: list[asyncio.Task] = []

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the daemon runs on, once started."""
        return self._loop

    async def start(self) -> list[str]:
        """Bind, start the server (health NOT_SERVING) and begin loading; returns the bound addresses."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self.settings.metrics_listen:
            self.metrics = Metrics(self.pool)
            self.metrics.start(self.settings.metrics_listen)
        try:
            frames = self.metrics.frames if self.metrics is not None else None
            self.server = await create_server(self.settings, self.pool, frames)
            await self.server.start()
        except BaseException:
            if self.metrics is not None:
                self.metrics.stop()
            raise
        if self.notifier.watchdog_interval:
            self._tasks.append(asyncio.ensure_future(self._keep_watchdog(self.notifier.watchdog_interval)))
        self._tasks.append(asyncio.ensure_future(descriptors.watch()))
        self.pool.load_in_background(progress=self._loading, on_ready=self._model_ready, on_done=self._loading_done)
        return self.server.addresses

    def reload(self) -> None:
        """SIGHUP: read the TLS files again for the next connections (tokens are read again as they change)."""
        if self.server is not None and self.server.certificates is not None:
            self.server.certificates.reload()
            logger.info("SIGHUP: the TLS files will be read again at the next connection")

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
        self.notifier.stopping("draining")
        await self.server.drain(grace)
        for task in self._tasks:
            task.cancel()
        left = tuple(await asyncio.to_thread(self.pool.close, WORKER_JOIN_S))
        if left:
            logger.warning("model worker %s still in a forward pass: exiting without it", ", ".join(left))
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
        logger.info("stopped")
        return Exit(1 if self._failure is not None else 0, left)

    def _loading(self, name: str, position: int, total: int) -> None:
        logger.info("loading model=%s (%d/%d)", name, position, total)
        self.notifier.status(f"loading {name} ({position}/{total})")

    def _model_ready(self, name: str) -> None:
        """From the loader thread: mark `name` SERVING on the event loop, unless the daemon has stopped."""
        try:
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._mark_ready(name)))
        except RuntimeError:  # the loop is closed: stopped while this model loaded
            pass

    async def _mark_ready(self, name: str) -> None:
        await self.server.mark_ready(name)
        if self.pool.ready:
            names = ", ".join(self.pool.names)
            self.notifier.ready(f"serving {names} on {', '.join(self.server.addresses)}")
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


async def serve(settings: Settings) -> Exit:
    """Run the daemon until SIGTERM/SIGINT; a second signal exits at once."""
    descriptors.raise_soft_limit()
    daemon = Daemon(settings, notifier=Notifier())
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
    loop.add_signal_handler(signal.SIGHUP, daemon.reload)
    try:
        await daemon.start()
    except (OSError, RuntimeError) as error:
        logger.error("cannot start: %s", error)
        return Exit(1)
    return await daemon.wait()
