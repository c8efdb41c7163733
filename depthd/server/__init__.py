"""The gRPC edge: the server, the DepthEstimator servicer, pb <-> domain conversion and status codes; no torch."""
