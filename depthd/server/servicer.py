"""The depthd.v1.DepthEstimator servicer: each RPC converts the request, calls the pool, converts back.

Status codes come from `status` (one place). In a stream a frame's error becomes that
frame's response and the stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import AsyncIterator, Iterator, Protocol

import grpc

from depthd.config import Limits
from depthd.errors import DepthdError, InvalidArgument, Unavailable
from depthd.server import convert
from depthd.server.status import INTERNAL_MESSAGE, Calls, refusals, status_of, stream_errors, unary_errors
from depthd.serving.batcher import Lane, PoolResult, release_result
from depthd.serving.pool import ModelPool
from depthd_client.v1 import depth_pb2 as pb
from depthd_client.v1 import depth_pb2_grpc

logger = logging.getLogger(__name__)


DROPPED_BACKLOG = 1024
"""Responses of dropped frames a stream may have waiting behind a frame still in the model."""


class FrameObserver(Protocol):
    """Told how each frame ended, once its answer is known (the daemon's metrics)."""

    def finished(self, done: PoolResult) -> None:
        """The frame's depth map, or its drop for a newer frame, is about to be sent."""

    def failed(self, model: str, status: str) -> None:
        """The frame is answered with an error: `status` is its status code's name (INVALID_ARGUMENT),
        `model` the model it named (the default's name if none), which may not be served."""


class Unobserved:
    """A FrameObserver that does nothing: metrics are off."""

    def finished(self, done: PoolResult) -> None:
        pass

    def failed(self, model: str, status: str) -> None:
        pass


class _Place:
    """A frame's place in its stream (a window place, or a dropped-backlog one), freed once:
    when it is answered, or as soon as the pool drops it for a newer frame."""

    def __init__(self, places: asyncio.Semaphore):
        self._places = places
        self._held = True

    def free(self) -> None:
        if self._held:
            self._held = False
            self._places.release()

    def free_if_dropped(self, pending: "Future[PoolResult]") -> None:
        if not pending.cancelled() and pending.exception() is None and pending.result().dropped:
            self.free()


@dataclass
class _Read:
    """A frame read from a stream: the ids its response echoes, and its answer to come (or why not)."""

    request: pb.EstimateRequest
    answer: "Future[PoolResult] | DepthdError"
    place: _Place

    def release(self) -> None:
        """Give back the bytes of this frame's answer, once it comes: sent, or never to be."""
        if isinstance(self.answer, Future):
            self.answer.add_done_callback(release_result)

    def abandon(self) -> None:
        """The stream ended before this frame was answered: give its place and bytes back."""
        self.place.free()
        if isinstance(self.answer, Future):
            self.answer.cancel()
        self.release()


@dataclass(frozen=True)
class _End:
    """The stream's reader stopped: the client finished, reading failed, or the daemon is draining."""

    error: BaseException | None = None


class DepthEstimatorService(depth_pb2_grpc.DepthEstimatorServicer):
    def __init__(self, pool: ModelPool, limits: Limits, frames: FrameObserver | None = None):
        self.pool = pool
        self.limits = limits
        self.frames = frames or Unobserved()
        self.draining = asyncio.Event()
        """Set on shutdown: new calls are refused, open streams read no further frames."""
        self.calls = Calls()

    @unary_errors
    async def Estimate(self, request: pb.EstimateRequest, context: grpc.aio.ServicerContext) -> pb.EstimateResponse:
        with self._failures_told(request.model):
            self._refuse_if_draining()
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            pending = self._submit(request, deadline)
            try:
                done = await asyncio.wrap_future(pending)
                response = convert.response(request, done)
            finally:
                # the reply is gRPC's now (or nobody's, if the call was cancelled): its bytes are no longer ours to count
                pending.add_done_callback(release_result)
        self.frames.finished(done)
        return response

    @stream_errors
    async def EstimateStream(
        self, request_iterator: AsyncIterator[pb.EstimateRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EstimateResponse]:
        # Frames are submitted as they are read. At most `stream_window` of them hold an
        # image and wait for an answer; past that the stream is not read, and HTTP/2 flow
        # control (a fixed, small window: server_options) holds the client. After a
        # latest_frame_wins frame the next is read without waiting for a place: it drops
        # the one before if that is still waiting, so such a stream holds at most the frame
        # in the model and the newest one, and only the ids of the dropped ones wait for
        # their turn to be answered. On shutdown the frames read so far are answered, then
        # the stream ends UNAVAILABLE.
        self._refuse_if_draining()
        window: asyncio.Queue[_Read | _End] = asyncio.Queue()
        lane = Lane()
        reader = asyncio.ensure_future(self._read(request_iterator, window, lane))
        try:
            while not isinstance(item := await window.get(), _End):
                try:
                    answer = await self._answer(item)
                    item.place.free()
                    answer.stream_dropped = lane.dropped
                    yield answer
                finally:
                    item.release()
            if item.error is not None:
                raise item.error
        finally:
            reader.cancel()
            while not window.empty():
                left = window.get_nowait()
                if isinstance(left, _Read):
                    left.abandon()

    @unary_errors
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[convert.model_info(s) for s in self.pool.models()],
            max_message_bytes=self.limits.max_message_bytes,
        )

    # --- helpers -----------------------------------------------------------------------------

    def _submit(
        self, request: pb.EstimateRequest, deadline: float | None, lane: Lane | None = None
    ) -> "Future[PoolResult]":
        source = convert.image_source(request)
        output = convert.output_spec(request, self.limits)
        geometry = convert.geometry(request)
        if geometry.stabilize and lane is None:
            raise InvalidArgument(
                "stabilize: for a stream's frames (EstimateStream); a single call has no frames before it to be stable with"
            )
        latest_wins = lane is not None and request.latest_frame_wins
        return self.pool.submit(request.model, source, output, deadline, lane, latest_wins, geometry)

    @contextlib.contextmanager
    def _failures_told(self, model: str) -> Iterator[None]:
        """Tell `frames` of a unary frame that fails, with the status code `unary_errors` will give it."""
        try:
            yield
        except DepthdError as error:
            self.frames.failed(self.pool.resolve(model), error.status)
            raise
        except Exception:
            self.frames.failed(self.pool.resolve(model), grpc.StatusCode.INTERNAL.name)
            raise

    def _refuse_if_draining(self) -> None:
        if self.draining.is_set():
            raise Unavailable("the daemon is shutting down; reconnect when it is back")

    async def _read(
        self, request_iterator: AsyncIterator[pb.EstimateRequest], window: asyncio.Queue, lane: Lane
    ) -> None:
        """Read the stream's frames into `window`, a place at a time; always end it with an `_End`."""
        requests = request_iterator.__aiter__()
        draining = asyncio.ensure_future(self.draining.wait())
        places = asyncio.Semaphore(self.limits.stream_window)
        backlog = asyncio.Semaphore(DROPPED_BACKLOG)
        loop = asyncio.get_running_loop()
        latest_wins = False
        following: asyncio.Future | None = None
        end = _End()
        try:
            while True:
                semaphore = backlog if latest_wins else places
                await semaphore.acquire()
                place = _Place(semaphore)
                following = asyncio.ensure_future(requests.__anext__())
                await asyncio.wait({following, draining}, return_when=asyncio.FIRST_COMPLETED)
                if not following.done():
                    place.free()
                    end = _End(Unavailable("the daemon is shutting down; reconnect when it is back"))
                    return
                try:
                    request = following.result()
                except StopAsyncIteration:
                    place.free()
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
                window.put_nowait(_Read(convert.ids_only(request), pending, place))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - the reader's failure must end the stream, not hang it
            end = _End(error)
        finally:
            draining.cancel()
            if following is not None:
                following.cancel()
                following.add_done_callback(_retrieved)
            window.put_nowait(end)

    async def _answer(self, item: _Read) -> pb.EstimateResponse:
        request = item.request
        model = self.pool.resolve(request.model)
        try:
            if isinstance(item.answer, DepthdError):
                raise item.answer
            done = await asyncio.wrap_future(item.answer)
            response = convert.response(request, done)
        except DepthdError as error:
            refusals.log("EstimateStream frame refused: %s %s", error.status, error)
            self.frames.failed(model, error.status)
            return convert.error_response(request, model, status_of(error).value[0], str(error))
        except Exception:
            logger.exception("internal error on a stream frame frame_id=%d", request.frame_id)
            self.frames.failed(model, grpc.StatusCode.INTERNAL.name)
            return convert.error_response(request, model, grpc.StatusCode.INTERNAL.value[0], INTERNAL_MESSAGE)
        self.frames.finished(done)
        return response


def _retrieved(task: asyncio.Future) -> None:
    """Mark a task's outcome as seen: a read cut short by the stream's end is no error."""
    if not task.cancelled():
        task.exception()
