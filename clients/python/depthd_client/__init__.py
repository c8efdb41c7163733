"""depthd's Python client: `DepthClient` (sync) and `AsyncDepthClient` (asyncio) for
estimate/stream/models/health, with TLS, mTLS and a bearer token, their typed options and results
(point clouds, the camera and the fit to depth hints included), and the generated stubs in `.v1`.

It needs grpcio, grpcio-health-checking, protobuf and numpy only; never torch or transformers.
Numpy frames are RGB unless `pixel_format` says otherwise.
"""

from depthd_client.aio import AsyncDepthClient
from depthd_client.channels import read_token_file
from depthd_client.client import DepthClient
from depthd_client.messages import (
    MAX_MESSAGE_BYTES_CEILING,
    Alignment,
    CameraIntrinsics,
    Colormap,
    DepthdError,
    DepthKind,
    DepthResult,
    Encoding,
    FrameError,
    HealthStatus,
    ModelInfo,
    PixelFormat,
    RequestOptions,
    StreamFrame,
    StreamOptions,
    Timing,
    build_request,
    to_image,
    to_result,
)

__version__ = "0.1.0"

__all__ = [
    "MAX_MESSAGE_BYTES_CEILING", "Alignment", "AsyncDepthClient", "CameraIntrinsics", "Colormap", "DepthClient",
    "DepthKind", "DepthResult", "DepthdError", "Encoding", "FrameError", "HealthStatus", "ModelInfo", "PixelFormat",
    "RequestOptions", "StreamFrame", "StreamOptions", "Timing", "build_request", "read_token_file", "to_image",
    "to_result",
]
