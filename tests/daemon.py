"""A real depthd daemon in this process, on a free loopback port, for the tests to talk to,
and the small tools the tests drive it with."""

from __future__ import annotations

import asyncio
import threading
import time

from depthd.config import Settings
from depthd.ops.daemon import Daemon
from depthd.serving.pool import ModelPool


class GatedPool(ModelPool):
    """A pool that starts loading only when the test opens the gate: health before warm-up is observable."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    def load(self, *args, **kwargs):
        self.gate.wait()
        return super().load(*args, **kwargs)


class DaemonThread:
    """A `Daemon` on its own event-loop thread; `address` is the bound host:port."""

    def __init__(self, settings: Settings, pool: ModelPool | None = None, notifier=None):
        self.daemon = Daemon(settings, pool, notifier)
        self.exit_code: int | None = None
        self._started = threading.Event()
        self._addresses: list[str] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-daemon", daemon=True)
        self._thread.start()
        if not self._started.wait(60):
            raise TimeoutError("daemon did not start")
        if self._error:
            raise self._error

    @property
    def address(self) -> str:
        return self._addresses[0]

    def _run(self) -> None:
        async def main() -> None:
            try:
                self._addresses = await self.daemon.start()
            except BaseException as error:
                self._error = error
                self._started.set()
                return
            self._started.set()
            self.exit_code = (await self.daemon.wait()).code

        asyncio.run(main())

    def stop(self, timeout: float = 30) -> int | None:
        self.daemon.request_stop()
        self._thread.join(timeout)
        return self.exit_code


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class Gate:
    """Wraps a model's forward. While shut, a forward pass waits at the gate; `step()` lets one
    waiting pass through, `release()` opens it for good. A pass whose batch holds a flat
    (single-colour) frame fails while `flat_frames_fail` is set."""

    def __init__(self, model):
        self.model = model
        self.forward = model.forward
        self.entered = threading.Event()
        self.flat_frames_fail = False
        self._condition = threading.Condition()
        self._open = True
        self._steps = 0
        model.forward = self._forward

    def _forward(self, pixel_values, **kwargs):
        with self._condition:
            self.entered.set()
            if not self._condition.wait_for(lambda: self._open or self._steps, timeout=60):
                raise TimeoutError("the test never opened the gate")
            if not self._open:
                self._steps -= 1
        if self.flat_frames_fail and pixel_values.flatten(2).std(2).eq(0).all(1).any():
            raise RuntimeError("a flat frame broke the forward pass")
        return self.forward(pixel_values=pixel_values, **kwargs)

    def shut(self) -> None:
        with self._condition:
            self.entered.clear()
            self._open = False

    def step(self) -> None:
        with self._condition:
            self._steps += 1
            self._condition.notify_all()

    def release(self) -> None:
        with self._condition:
            self._open = True
            self._condition.notify_all()


def serving(settings: Settings) -> DaemonThread:
    """A daemon started and waited for until health says SERVING (its models loaded and warm)."""
    from depthd_client import DepthClient

    running = DaemonThread(settings)
    with DepthClient(running.address) as client:
        client.wait_until_serving(60)
    return running


def gated_daemon(settings: Settings, gated: tuple[str, ...]):
    """For a module fixture (`yield from`): a serving daemon whose `gates` hold the named models'
    forward passes at will; released and stopped (exit 0) at the end."""
    running = serving(settings)
    running.gates = {name: Gate(running.daemon.pool.engine(name).checkpoint.model) for name in gated}
    yield running
    for gate in running.gates.values():
        gate.release()
    assert running.stop() == 0


def in_thread(function, *args) -> tuple[threading.Thread, list]:
    """Run `function(*args)` on a thread; the box gets its result, or the exception it raised."""
    box: list = []

    def run():
        try:
            box.append(function(*args))
        except Exception as error:  # noqa: BLE001 - the test looks at what came back
            box.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def queue(daemon: DaemonThread, model: str):
    """What the daemon's pool reports of `model` now: its public status (queue depth and readiness, counts)."""
    return next(status for status in daemon.daemon.pool.models() if status.name == model)
