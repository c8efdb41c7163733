"""Prometheus metrics: the daemon's own registry, what goes on it, and the /metrics HTTP endpoint.

What the pool already counts (frames dropped, forward passes by batch size, queue depth,
models ready) is read from it at each scrape (`PoolCollector`); what only a frame's end
knows (answered, or refused with which status code, and its latencies) is observed there
(`FrameMetrics`, the servicer's FrameObserver). The registry is the daemon's own, not
prometheus_client's global one, so that several daemons can run in one process (the
tests do). Times are in seconds, as Prometheus has it.
"""

from __future__ import annotations

import logging
import platform
import threading
from importlib import metadata
from typing import Iterable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from depthd import __version__
from depthd.serving.batcher import PoolResult
from depthd.serving.pool import ModelPool, ModelStatus

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds: from a small model's milliseconds on a GPU to a large one's seconds on a CPU."""
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)
"""Frames in a forward pass, up to the largest max_batch."""
NOT_SERVED = ""
"""The model label of a frame that named a model not served: names a client makes up must not
each become a series of their own."""
BUILD_PACKAGES = ("torch", "transformers", "grpcio")


class FrameMetrics:
    """Frames answered and refused, and the latencies of those answered, per model: told by the
    servicer as each frame ends (a FrameObserver)."""

    def __init__(self, registry: CollectorRegistry, models: Iterable[str]):
        self.models = frozenset(models)
        self.answered = Counter("depthd_frames_answered", "Frames answered with a depth map.", ["model"],
                                registry=registry)
        self.errored = Counter("depthd_frames_errored", "Frames answered with an error, by its gRPC status code.",
                               ["model", "code"], registry=registry)
        self.queue = self._latency(registry, "depthd_frame_queue_seconds",
                                   "From a frame's arrival to the start of its forward pass, decoding included.")
        self.inference = self._latency(registry, "depthd_frame_inference_seconds",
                                       "The forward pass of a frame's batch (the response's timing.inference_ms).")
        self.latency = self._latency(registry, "depthd_frame_latency_seconds",
                                     "From a frame's arrival to its answer, ready to send.")
        for model in self.models:
            for metric in (self.answered, self.queue, self.inference, self.latency):
                metric.labels(model)

    @staticmethod
    def _latency(registry: CollectorRegistry, name: str, documentation: str) -> Histogram:
        return Histogram(name, documentation, ["model"], buckets=LATENCY_BUCKETS, registry=registry)

    def finished(self, done: PoolResult) -> None:
        if done.dropped:
            return  # the batcher counts it: depthd_frames_dropped_total
        model = done.model
        self.answered.labels(model).inc()
        self.queue.labels(model).observe(done.queue_ms / 1000)
        self.inference.labels(model).observe(done.result.timing.inference_ms / 1000)
        self.latency.labels(model).observe(done.total_ms / 1000)

    def failed(self, model: str, status: str) -> None:
        self.errored.labels(model if model in self.models else NOT_SERVED, status).inc()


class PoolCollector(Collector):
    """What the pool counts itself, per configured model (zeros until it is loaded), read at each scrape."""

    def __init__(self, pool: ModelPool):
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        ready = GaugeMetricFamily("depthd_model_ready", "1 once the model is loaded and warm, else 0.",
                                  labels=["model"])
        depth = GaugeMetricFamily("depthd_queue_depth", "Frames waiting now: decoding, or ready for a forward pass.",
                                  labels=["model"])
        held = GaugeMetricFamily("depthd_held_bytes", "Bytes the model's frames hold now: requests, pixels, "
                                 "input tensors and replies not yet sent (against max_queue_bytes).", labels=["model"])
        dropped = CounterMetricFamily("depthd_frames_dropped", "Frames dropped for a newer frame of their stream "
                                      "(latest_frame_wins).", labels=["model"])
        batches = HistogramMetricFamily("depthd_batch_size", "Frames in each forward pass.", labels=["model"])
        for status in self.pool.models():
            labels = [status.name]
            ready.add_metric(labels, 1.0 if status.ready else 0.0)
            depth.add_metric(labels, status.queue_depth)
            held.add_metric(labels, status.bytes_held)
            dropped.add_metric(labels, status.frames_dropped)
            batches.add_metric(labels, _batch_buckets(status), sum(n * passes for n, passes in status.batch_sizes.items()))
        yield from (ready, depth, held, dropped, batches)


def _batch_buckets(status: ModelStatus) -> list[tuple[str, float]]:
    """The forward passes of at most each bucket's number of frames (Prometheus's cumulative `le` buckets)."""
    passes = status.batch_sizes
    bounded = [(floatToGoString(bound), sum(count for n, count in passes.items() if n <= bound)) for bound in BATCH_BUCKETS]
    return [*bounded, ("+Inf", sum(passes.values()))]


def build_labels() -> dict[str, str]:
    """depthd's version and those of what it runs on, as read from the installed packages (no import)."""
    labels = {"version": __version__, "python": platform.python_version()}
    for package in BUILD_PACKAGES:
        try:
            labels[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            labels[package] = ""
    return labels


class Metrics:
    """The daemon's registry, with everything on it, and its /metrics endpoint once started."""

    def __init__(self, pool: ModelPool):
        self.registry = CollectorRegistry()
        self.frames = FrameMetrics(self.registry, pool.names)
        self.registry.register(PoolCollector(pool))
        Info("depthd_build", "depthd's version, and those of Python, torch, transformers and grpcio.",
             registry=self.registry).info(build_labels())
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.url: str | None = None
        """http://host:port/metrics, with the bound port, once started."""
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, address: str) -> str:
        """Serve /metrics at `address` (host:port; port 0: any free one) on a thread; returns the URL."""
        host, _, port = address.rpartition(":")
        try:
            self._server, self._thread = start_http_server(int(port), host.strip("[]"), self.registry)
        except OSError as error:
            raise RuntimeError(f"metrics_listen {address}: cannot listen there ({error.strerror or error})") from error
        self.url = f"http://{host}:{self._server.server_port}/metrics"
        logger.info("metrics on %s", self.url)
        return self.url

    def stop(self) -> None:
        """Stop serving and close the port (it can be bound again at once); waits up to half a second."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = self._thread = None
