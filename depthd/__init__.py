"""depthd: a gRPC daemon that serves monocular depth estimation from warm transformers models."""

__version__ = "0.1.0"
