"""Domain errors, each carrying the name of the gRPC status code it maps to.

The names are plain strings so that the engine and the pool can raise them without
knowing gRPC; the service turns `status` into a `grpc.StatusCode` in one place.
"""

from __future__ import annotations


class DepthdError(Exception):
    """Base of every error depthd raises on purpose."""

    status = "INTERNAL"


class InvalidArgument(DepthdError):
    """The request is malformed: the message names the field and the limit."""

    status = "INVALID_ARGUMENT"


class NotFound(DepthdError):
    """The request names a model the daemon does not serve."""

    status = "NOT_FOUND"


class ResourceExhausted(DepthdError):
    """A limit was hit: too many pixels, too large a message, or a full queue."""

    status = "RESOURCE_EXHAUSTED"


class Unavailable(DepthdError):
    """The daemon or the model cannot answer now: loading, or shutting down."""

    status = "UNAVAILABLE"


class DeadlineExceeded(DepthdError):
    """The caller's deadline passed before its frame reached the model."""

    status = "DEADLINE_EXCEEDED"


class ModelLoadError(DepthdError):
    """A model could not be loaded; the message names the model and the cause."""

    status = "FAILED_PRECONDITION"

    def __init__(self, model: str, source: str, cause: str):
        self.model = model
        self.source = source
        super().__init__(f"cannot load model {model!r} from {source!r}: {cause}")


class UnsupportedArchitecture(ModelLoadError):
    """The checkpoint is of an architecture depthd does not run."""
