"""The depthd.v1.DepthEstimator servicer: each RPC converts the request, calls the pool, converts back.

Errors map to status codes in one place: a `DepthdError` carries the name of its code;
anything else is INTERNAL, logged once with its traceback. In a stream a frame's
error becomes that frame's response and the stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from concurrent.futures import Future
from typing import AsyncIterator

import grpc

from depthd import convert
from depthd.config import Limits
from depthd.errors import DepthdError, Unavailable
from depthd.pool import Lane, ModelPool, PoolResult
from depthd_client.v1 import depth_pb2 as pb
from depthd_client.v1 import depth_pb2_grpc

logger = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the daemon's log has the details"


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


_DRAINED = object()
"""Put in a stream's window when the daemon started draining before the client finished sending."""

DROPPED_BACKLOG = 1024
"""Responses of dropped frames a stream may have waiting behind a frame still in the model."""


class _Place:
    """A frame's place in its stream's window, freed once: when it is answered or dropped."""

    def __init__(self, places: asyncio.Semaphore, held: bool):
        self._places = places
        self._held = held

    def free(self) -> None:
        if self._held:
            self._held = False
            self._places.release()

    def free_if_dropped(self, pending: "Future[PoolResult]") -> None:
        if not pending.cancelled() and pending.exception() is None and pending.result().dropped:
            self.free()


class DepthEstimatorService(depth_pb2_grpc.DepthEstimatorServicer):
    def __init__(self, pool: ModelPool, limits: Limits):
        self.pool = pool
        self.limits = limits
        self.draining = asyncio.Event()
        """Set on shutdown: new calls are refused, open streams read no further frames."""
        self.calls = Calls()

    @unary_errors
    async def Estimate(self, request: pb.EstimateRequest, context: grpc.aio.ServicerContext) -> pb.EstimateResponse:
        self._refuse_if_draining()
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        done = await asyncio.wrap_future(self._submit(request, deadline))
        return convert.response(request, done)

    @stream_errors
    async def EstimateStream(
        self, request_iterator: AsyncIterator[pb.EstimateRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EstimateResponse]:
        # Frames are submitted as they are read. At most `stream_window` of them hold an
        # image and wait for an answer; past that the stream is not read, and HTTP/2 flow
        # control holds the client. After a latest_frame_wins frame the next is read
        # without waiting for a place: it drops the one before if that is still waiting,
        # so such a stream holds at most the frame in the model and the newest one, and
        # only the ids of the dropped ones wait for their turn to be answered.
        # On shutdown the frames read so far are answered, then the stream ends UNAVAILABLE.
        self._refuse_if_draining()
        window: asyncio.Queue = asyncio.Queue(maxsize=self.limits.stream_window + DROPPED_BACKLOG)
        lane = Lane()
        reader = asyncio.ensure_future(self._read(request_iterator, window, lane))
        try:
            while (item := await window.get()) is not None:
                if item is _DRAINED:
                    self._refuse_if_draining()
                request, pending, place = item
                answer = await self._answer(request, pending)
                place.free()
                answer.stream_dropped = lane.dropped
                yield answer
            await reader
        finally:
            reader.cancel()
            while not window.empty():
                item = window.get_nowait()
                if isinstance(item, tuple) and isinstance(item[1], Future):
                    item[1].cancel()

    @unary_errors
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[convert.model_info(s) for s in self.pool.models()])

    # --- helpers -----------------------------------------------------------------------------

    def _submit(
        self, request: pb.EstimateRequest, deadline: float | None, lane: Lane | None = None
    ) -> "Future[PoolResult]":
        source = convert.image_source(request)
        spec = convert.output_spec(request, self.limits)
        latest_wins = lane is not None and request.latest_frame_wins
        return self.pool.submit(request.model, source, spec, deadline, lane, latest_wins)

    def _refuse_if_draining(self) -> None:
        if self.draining.is_set():
            raise Unavailable("the daemon is shutting down; reconnect when it is back")

    async def _read(
        self, request_iterator: AsyncIterator[pb.EstimateRequest], window: asyncio.Queue, lane: Lane
    ) -> None:
        requests = request_iterator.__aiter__()
        draining = asyncio.ensure_future(self.draining.wait())
        places = asyncio.Semaphore(self.limits.stream_window)
        loop = asyncio.get_running_loop()
        latest_wins = False
        try:
            while True:
                if not latest_wins:
                    await places.acquire()
                place = _Place(places, held=not latest_wins)
                following = asyncio.ensure_future(requests.__anext__())
                await asyncio.wait({following, draining}, return_when=asyncio.FIRST_COMPLETED)
                if not following.done():
                    following.cancel()
                    await window.put(_DRAINED)
                    return
                try:
                    request = following.result()
                except StopAsyncIteration:
                    await window.put(None)
                    return
                latest_wins = request.latest_frame_wins
                try:
                    pending: Future | DepthdError = self._submit(request, None, lane)
                except DepthdError as error:
                    pending = error
                else:
                    pending.add_done_callback(
                        lambda done, place=place: loop.call_soon_threadsafe(place.free_if_dropped, done)
                    )
                await window.put((convert.ids_only(request), pending, place))
        finally:
            draining.cancel()

    async def _answer(self, request: pb.EstimateRequest, pending: "Future[PoolResult] | DepthdError") -> pb.EstimateResponse:
        try:
            if isinstance(pending, DepthdError):
                raise pending
            return convert.response(request, await asyncio.wrap_future(pending))
        except DepthdError as error:
            return convert.error_response(request, status_of(error).value[0], str(error))
        except Exception:
            logger.exception("internal error on a stream frame frame_id=%d", request.frame_id)
            return convert.error_response(request, grpc.StatusCode.INTERNAL.value[0], INTERNAL_MESSAGE)
