"""The sync client: `DepthClient(target)` and its calls on a `grpc.Channel`.

It takes what a robot has at hand (a path, file bytes, a numpy HxWxC uint8 array, RGB unless
`pixel_format` says otherwise, a PIL image) and returns numpy depth maps with what they mean.
RPC failures raise `DepthdError`, which carries the gRPC status code; in a stream a frame that
failed comes back as a result with `error` set, and the stream goes on. Everything but the calls
(request building, response and error conversion) is in `messages`, and the channel (TLS) and the
calls' metadata (a token) in `channels`, both shared with the asyncio client in `aio`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from depthd_client.channels import Connection, PathLike
from depthd_client.messages import (
    DEFAULT_TARGET,
    MAX_MESSAGE_BYTES_CEILING,
    DepthdError,
    DepthResult,
    FrameError,
    HealthStatus,
    ImageLike,
    ModelInfo,
    RequestOptions,
    Retries,
    ServingWait,
    StreamFrame,
    StreamOptions,
    StreamRequests,
    Timing,
    Unpack,
    build_request,
    health_failure,
    health_request,
    health_status,
    make_request,
    rpc_errors,
    to_image,
    to_models,
    to_result,
)
from depthd_client.v1 import depth_pb2 as pb
from depthd_client.v1 import depth_pb2_grpc

__all__ = [
    "DEFAULT_TARGET", "MAX_MESSAGE_BYTES_CEILING", "DepthClient", "DepthdError", "DepthResult", "FrameError",
    "ModelInfo", "StreamFrame", "Timing", "build_request", "to_image", "to_result",
]


class DepthClient:
    """A connection to a depthd daemon: `"host:port"` or `"unix:///run/depthd/depthd.sock"`, or a
    `channel` of your own, which `close()` closes. `timeout` is the default for every call but
    `stream`. Numpy frames are RGB unless `pixel_format` says otherwise: OpenCV and cv_bridge hand out
    BGR, so pass `pixel_format="bgr8"` with their frames (nothing in the pixels can tell the two apart).

    Security (TCP targets; a unix socket stays plaintext, guarded by its file permissions):
    `tls_ca` (a PEM file: the CA that signed the daemon's certificate) turns TLS on; `tls_cert` and
    `tls_key` (PEM files, both or neither) present a client certificate to a daemon that asks for one
    (mTLS). `token` is sent as `authorization: Bearer <token>` with every call, on any channel.
    A mistake in these is a ValueError (a PEM file that cannot be read, an OSError) raised here.

    `reconnect=True` rides out a daemon restart (a watchdog's, an upgrade's): a call waits for the daemon
    to come back, and a call answered UNAVAILABLE is made again, until the call's timeout. A stream
    that breaks is opened again for the frames that follow; the frames it had taken but not answered
    come back as results with `error` set (UNAVAILABLE), so there is still one result per frame.

        DepthClient("robot-01.local:50051", tls_ca="ca.pem", tls_cert="client.pem",
                    tls_key="client.key", token=read_token_file("/etc/robot/depthd.token"))
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 30.0,
        channel: grpc.Channel | None = None,
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
        self._channel = channel or connection.channel()
        self._stub = depth_pb2_grpc.DepthEstimatorStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> DepthClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def estimate(
        self, image: ImageLike, *, timeout: float | None = None, **options: Unpack[RequestOptions]
    ) -> DepthResult:
        """Depth for one image: a path, encoded bytes, an HxW/HxWxC uint8 array (RGB unless
        `pixel_format` says otherwise) or a PIL image. `options` are those of `RequestOptions`."""
        request = make_request(image, options, "estimate")
        return to_result(self._unary(self._stub.Estimate, request, timeout))

    def _unary(self, method: grpc.UnaryUnaryMultiCallable, request: object, timeout: float | None) -> Any:
        retries = Retries(self.reconnect, timeout or self.timeout)
        while True:
            try:
                with rpc_errors():
                    return method(request, timeout=retries.left(), metadata=self._metadata,
                                  wait_for_ready=retries.wait_for_ready)
            except DepthdError as error:
                pause = retries.after(error)
                if pause is None:
                    raise
            time.sleep(pause)

    def stream(
        self,
        frames: Iterable[ImageLike | StreamFrame],
        *,
        latest_frame_wins: bool = False,
        timeout: float | None = None,
        **options: Unpack[StreamOptions],
    ) -> Iterator[DepthResult]:
        """One result per frame, in order, over one stream. Items are images (as for `estimate`; numpy
        frames are RGB unless `pixel_format` says otherwise) or `StreamFrame`s, which carry their own
        id, capture time, pixel format, camera or hints (a LiDAR's, each frame). `options` hold for every
        frame (`stabilize` among them). A frame the daemon fails comes back with `error` set and the stream
        goes on; a frame that cannot be sent raises its error after the results of the frames before it.
        Stopping the iteration early cancels the stream."""
        requests = StreamRequests(options, latest_frame_wins)
        return self._results(requests, frames, timeout)

    def _results(
        self, requests: StreamRequests, frames: Iterable[ImageLike | StreamFrame], timeout: float | None
    ) -> Iterator[DepthResult]:
        frames = iter(frames)
        retries = Retries(self.reconnect, timeout)
        while True:
            call = self._stub.EstimateStream(requests.from_iterable(frames), timeout=retries.left(),
                                             metadata=self._metadata, wait_for_ready=retries.wait_for_ready)
            try:
                with requests.reading(call):
                    for response in call:
                        yield from requests.answered()
                        retries.succeeded()
                        yield to_result(response)
                return
            except DepthdError as error:
                pause = retries.after(error)
                if pause is None:
                    raise
                yield from requests.broke(error)
                if requests.exhausted:
                    return
            time.sleep(pause)

    def models(self, timeout: float | None = None) -> list[ModelInfo]:
        return to_models(self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout))

    def health(self, service: str = "", timeout: float | None = None) -> HealthStatus:
        """The standard gRPC health status: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN".
        `service` is "" (the daemon), "depthd.v1.DepthEstimator" or "depthd.v1.DepthEstimator/<model>"."""
        try:
            response = self._health.Check(
                health_request(service), timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            return health_failure(error)
        return health_status(response)

    def wait_until_serving(self, timeout: float = 120.0, service: str = "") -> None:
        """Block until health says SERVING (models loaded and warm); DepthdError on timeout."""
        wait = ServingWait(self.target, timeout, service)
        while True:
            call = self._health.Watch(
                wait.request, timeout=wait.left(), wait_for_ready=True, metadata=self._metadata
            )
            try:
                if any(wait.serving(response) for response in call):
                    return
            except grpc.RpcError as error:
                time.sleep(wait.pause_after(error))
            finally:
                call.cancel()
