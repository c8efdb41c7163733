"""Memory bounded in bytes: what frames hold in the daemon, counted against a model's and the daemon's limits."""

from __future__ import annotations

import threading

from depthd.errors import ResourceExhausted

MIB = 1024 * 1024


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


def _mib(count: int) -> str:
    return f"{count / MIB:.1f} MiB"
