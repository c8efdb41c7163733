"""Errors to status codes, in one place: a `DepthdError` carries the name of its code and is
logged once, briefly and rate-limited, as the client's doing; anything else is INTERNAL,
logged with its traceback. And the count of calls in progress, which a drain waits on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time

import grpc

from depthd.errors import DepthdError

logger = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the daemon's log has the details"


class RateLimited:
    """At most `per_minute` lines a minute through `logger`, then one line saying how many were left
    out: for events a client can cause at will, so that one client cannot flood the journal."""

    def __init__(self, logger: logging.Logger, level: int, per_minute: int, clock=time.monotonic):
        self._logger = logger
        self._level = level
        self._per_minute = per_minute
        self._clock = clock
        self._lock = threading.Lock()
        self._window = float("-inf")
        self._count = 0
        self._skipped = 0

    def log(self, message: str, *args: object) -> None:
        now = self._clock()
        with self._lock:
            if now - self._window >= 60:
                skipped, self._skipped = self._skipped, 0
                self._window, self._count = now, 0
                if skipped:
                    self._logger.log(self._level, "%d more like the lines above were not logged in the last minute", skipped)
            if self._count >= self._per_minute:
                self._skipped += 1
                return
            self._count += 1
        self._logger.log(self._level, message, *args)


refusals = RateLimited(logger, logging.INFO, per_minute=20)
"""Requests refused for the client's own doing: worth a line, never a flood of them."""


def status_of(error: DepthdError) -> grpc.StatusCode:
    return grpc.StatusCode[error.status]


def unary_errors(method):
    """Turn a unary method's domain errors into their status codes, and the unexpected into INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        with self.calls.active():
            try:
                return await method(self, request, context)
            except DepthdError as error:
                refusals.log("%s refused: %s %s", method.__name__, error.status, error)
                await context.abort(status_of(error), str(error))
            except Exception:
                logger.exception("internal error in %s", method.__name__)
                await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)

    return wrapper


def stream_errors(method):
    """The same for a streaming method: per-frame errors are handled inside, the rest end the stream."""

    @functools.wraps(method)
    async def wrapper(self, request_iterator, context: grpc.aio.ServicerContext):
        with self.calls.active():
            try:
                async for response in method(self, request_iterator, context):
                    yield response
            except DepthdError as error:
                refusals.log("%s ended: %s %s", method.__name__, error.status, error)
                await context.abort(status_of(error), str(error))
            except Exception:
                logger.exception("internal error in %s", method.__name__)
                await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)

    return wrapper


class Calls:
    """Counts the RPCs in progress, so that a drain can wait until the last one is answered."""

    def __init__(self) -> None:
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()

    @contextlib.contextmanager
    def active(self):
        self.count += 1
        self.idle.clear()
        try:
            yield
        finally:
            self.count -= 1
            if self.count == 0:
                self.idle.set()
