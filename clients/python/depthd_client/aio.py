"""The asyncio client: `AsyncDepthClient(target)`, the same calls as `DepthClient` on a `grpc.aio.Channel`.

Only the calls are here; request building, response and error conversion are in `messages`, and the
channel (TLS) and the calls' metadata (a token) in `channels`, shared with the sync client, so both
take the same options and give the same results and errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2_grpc

from depthd_client.channels import Connection, PathLike
from depthd_client.messages import (
    DEFAULT_TARGET,
    DepthdError,
    DepthResult,
    Frames,
    HealthStatus,
    ImageLike,
    ModelInfo,
    RequestOptions,
    Retries,
    ServingWait,
    StreamOptions,
    StreamRequests,
    Unpack,
    health_failure,
    health_request,
    health_status,
    make_request,
    rpc_errors,
    to_models,
    to_result,
)
from depthd_client.v1 import depth_pb2 as pb
from depthd_client.v1 import depth_pb2_grpc

__all__ = ["AsyncDepthClient"]


class AsyncDepthClient:
    """A connection to a depthd daemon for asyncio code: `"host:port"` or
    `"unix:///run/depthd/depthd.sock"`, or a `grpc.aio` `channel` of your own, which `close()` closes.
    `timeout` is the default for every call but `stream`. Numpy frames are RGB unless `pixel_format`
    says otherwise. `tls_ca`, `tls_cert`, `tls_key` and `token` are those of `DepthClient`: TLS (and
    mTLS) for a TCP target, and a token sent as `authorization: Bearer <token>` with every call.

        async with AsyncDepthClient("127.0.0.1:50051") as client:
            await client.wait_until_serving()
            result = await client.estimate(frame, pixel_format="bgr8")
            async for result in client.stream(camera_frames()):
                ...

    Open it inside the event loop that uses it. Failures raise `DepthdError`, as in `DepthClient`.
    `reconnect=True` makes `estimate` and `models` ride out a daemon restart as in `DepthClient`, and a
    stream wait for the daemon to be reachable when it opens; a stream that breaks raises here.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 30.0,
        channel: grpc.aio.Channel | None = None,
        tls_ca: PathLike | None = None,
        tls_cert: PathLike | None = None,
        tls_key: PathLike | None = None,
        token: str | None = None,
        reconnect: bool = False,
    ):
        connection = Connection(
            target, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token, own_channel=channel is not None
        )
        self.target = target
        self.timeout = timeout
        self.reconnect = reconnect
        self._metadata = connection.metadata
        self._channel = channel or connection.aio_channel()
        self._stub = depth_pb2_grpc.DepthEstimatorStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> AsyncDepthClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def estimate(
        self, image: ImageLike, *, timeout: float | None = None, **options: Unpack[RequestOptions]
    ) -> DepthResult:
        """Depth for one image: a path, encoded bytes, an HxW/HxWxC uint8 array (RGB unless
        `pixel_format` says otherwise) or a PIL image. `options` are those of `RequestOptions`.
        A path is read, and a frame converted, on the event loop."""
        request = make_request(image, options, "estimate")
        return to_result(await self._unary(self._stub.Estimate, request, timeout))

    async def _unary(self, method: Any, request: object, timeout: float | None) -> Any:
        retries = Retries(self.reconnect, timeout or self.timeout)
        while True:
            try:
                with rpc_errors():
                    return await method(request, timeout=retries.left(), metadata=self._metadata,
                                        wait_for_ready=retries.wait_for_ready)
            except DepthdError as error:
                pause = retries.after(error)
                if pause is None:
                    raise
            await asyncio.sleep(pause)

    def stream(
        self,
        frames: Frames,
        *,
        latest_frame_wins: bool = False,
        timeout: float | None = None,
        **options: Unpack[StreamOptions],
    ) -> AsyncIterator[DepthResult]:
        """One result per frame, in order, over one stream: `async for result in client.stream(frames)`.
        `frames` is a sync or async iterable of images (as for `estimate`; numpy frames are RGB unless
        `pixel_format` says otherwise) or `StreamFrame`s, which carry their own id, capture time, pixel
        format, camera or hints; a sync one is read on the event loop, so it must not block. `options`
        hold for every frame (`stabilize` among them), and are checked here, before the stream opens. A
        frame the daemon fails comes back with `error` set and the stream goes on; a frame that cannot be
        sent raises its error after the results of the frames before it. Stopping early cancels the
        stream (at once with `contextlib.aclosing`, else when asyncio finalizes the iterator)."""
        requests = StreamRequests(options, latest_frame_wins)
        return self._results(requests, frames, timeout)

    async def _results(
        self, requests: StreamRequests, frames: Frames, timeout: float | None
    ) -> AsyncIterator[DepthResult]:
        call = self._stub.EstimateStream(requests.from_any(frames), timeout=timeout, metadata=self._metadata,
                                         wait_for_ready=True if self.reconnect else None)
        with requests.reading(call):
            async for response in call:
                yield to_result(response)

    async def models(self, timeout: float | None = None) -> list[ModelInfo]:
        return to_models(await self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout))

    async def health(self, service: str = "", timeout: float | None = None) -> HealthStatus:
        """The standard gRPC health status: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN".
        `service` is "" (the daemon), "depthd.v1.DepthEstimator" or "depthd.v1.DepthEstimator/<model>"."""
        try:
            response = await self._health.Check(
                health_request(service), timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            return health_failure(error)
        return health_status(response)

    async def wait_until_serving(self, timeout: float = 120.0, service: str = "") -> None:
        """Wait until health says SERVING (models loaded and warm); DepthdError on timeout."""
        wait = ServingWait(self.target, timeout, service)
        while True:
            call = self._health.Watch(
                wait.request, timeout=wait.left(), wait_for_ready=True, metadata=self._metadata
            )
            try:
                async for response in call:
                    if wait.serving(response):
                        return
            except grpc.RpcError as error:
                await asyncio.sleep(wait.pause_after(error))
            finally:
                call.cancel()
