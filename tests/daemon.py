"""A real depthd daemon in this process, on a free loopback port, for the tests to talk to."""

from __future__ import annotations

import asyncio
import threading

from depthd.config import Settings
from depthd.pool import ModelPool
from depthd.server import DepthDaemon


class GatedPool(ModelPool):
    """A pool that starts loading only when the test opens the gate: health before warm-up is observable."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    def load(self, *args, **kwargs):
        self.gate.wait()
        return super().load(*args, **kwargs)


class RunningDaemon:
    """`DepthDaemon` on its own event-loop thread; `address` is the bound host:port."""

    def __init__(self, settings: Settings, pool: ModelPool | None = None):
        self.daemon = DepthDaemon(settings, pool)
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
            self.exit_code = await self.daemon.wait()

        asyncio.run(main())

    def stop(self, timeout: float = 30) -> int | None:
        self.daemon.request_stop()
        self._thread.join(timeout)
        return self.exit_code
