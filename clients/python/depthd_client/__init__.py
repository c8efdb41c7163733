"""depthd's Python client: `DepthClient` for estimate/stream/models/health, and the generated stubs in `.v1`.

It needs grpcio, protobuf and numpy only; never torch or transformers.
"""

from depthd_client.client import (
    MAX_MESSAGE_BYTES_CEILING,
    DepthClient,
    DepthdError,
    DepthResult,
    FrameError,
    ModelInfo,
    StreamFrame,
    Timing,
)

__version__ = "0.1.0"

__all__ = ["MAX_MESSAGE_BYTES_CEILING", "DepthClient", "DepthdError", "DepthResult", "FrameError", "ModelInfo", "StreamFrame", "Timing"]
