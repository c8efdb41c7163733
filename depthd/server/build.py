"""Build the gRPC server (`create_server`): its channel arguments, services and bound addresses;
and drain it on shutdown.

`create_server` binds the listen addresses and registers the services without starting
anything; health is NOT_SERVING for everything until each model is marked ready.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from depthd.config import Limits, Settings, remote_addresses
from depthd.errors import Unavailable
from depthd.server import security
from depthd.server.security import Certificates
from depthd.server.servicer import DepthEstimatorService, FrameObserver
from depthd.serving.pool import ModelPool
from depthd_client.v1 import depth_pb2, depth_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = depth_pb2.DESCRIPTOR.services_by_name["DepthEstimator"].full_name
MAX_STREAMS_PER_CONNECTION = 100
"""Concurrent calls on one connection (a robot's cameras share one): gRPC's default is unlimited."""
LAST_ANSWERS_S = 1.0
"""After the drain's grace: time for the last answers (UNAVAILABLE ones included) to go out."""
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def server_options(limits: Limits) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments, each a limit that no client can push past."""
    return [
        # a request carries one frame: refuse larger ones (RESOURCE_EXHAUSTED) before reading them
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        # a reply is checked against the same figure before any work; this only backs that up
        ("grpc.max_send_message_length", limits.max_message_bytes),
        # HTTP/2 flow control is what holds a sender once a stream's window of frames is full:
        # keep each stream's window fixed and small (BDP probing would grow it to megabytes,
        # hundreds of small frames, all of them stale by the time they are read)
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", limits.transport_window_bytes),
        # calls one connection may have open at once; more wait in the client
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        # close connections with no call for a while: idle sockets cost file descriptors
        ("grpc.max_connection_idle_ms", int(limits.max_connection_idle_s * 1000)),
        # ping idle connections so a robot that lost power frees its streams
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # accept clients' own keepalive pings down to every 10 s, even between calls; a client
        # that pings more often is sent GOAWAY after max_ping_strikes bad pings
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_ping_strikes", 2),
        # a second daemon on the same port must fail to bind, not share the port
        ("grpc.so_reuseport", 0),
    ]


def model_health_name(model: str) -> str:
    return f"{SERVICE_NAME}/{model}"


@dataclass
class Server:
    """A built gRPC server with its health and DepthEstimator services, and the pool they serve."""

    server: grpc.aio.Server
    health: health_aio.HealthServicer
    servicer: DepthEstimatorService
    pool: ModelPool
    addresses: list[str] = field(default_factory=list)
    """The bound addresses, with the real port where 0 was asked for."""
    certificates: Certificates | None = None
    """The TLS material of the TCP ports, when there is TLS; `reload()` on SIGHUP."""

    async def start(self) -> None:
        await self.server.start()
        logger.info("listening on %s", ", ".join(self.addresses))

    async def set_health(self, status: int, *names: str) -> None:
        for name in names:
            await self.health.set(name, status)

    async def mark_ready(self, model: str) -> None:
        await self.set_health(SERVING, model_health_name(model))
        if self.pool.ready:
            await self.set_health(SERVING, "", SERVICE_NAME)

    async def drain(self, grace: float) -> None:
        """Health NOT_SERVING, new calls UNAVAILABLE, calls in progress answered: then stop.

        The server keeps accepting connections meanwhile, so a late caller is told
        UNAVAILABLE (and a health check NOT_SERVING) rather than finding the port closed.
        Frames still unanswered when the grace is over are answered UNAVAILABLE.
        """
        await self.health.enter_graceful_shutdown()
        calls = self.servicer.calls
        self.servicer.draining.set()
        if not await _within(calls.idle.wait(), grace):
            failed = self.pool.abort(Unavailable(
                f"the daemon is shutting down and this frame was not done within drain_grace_s ({grace:g} s)"
            ))
            logger.warning("%d call(s) still running after the %.1f s grace: %d frame(s) answered UNAVAILABLE",
                           calls.count, grace, failed)
            await _within(calls.idle.wait(), LAST_ANSWERS_S)
        await self.server.stop(LAST_ANSWERS_S)


async def create_server(settings: Settings, pool: ModelPool, frames: FrameObserver | None = None) -> Server:
    """Bind and register; start nothing. Health is NOT_SERVING for everything until `mark_ready`.
    `frames`, when given, is told how each frame ends (the metrics).

    TCP ports get TLS when it is configured; unix sockets are plaintext, created 0660 for
    `socket_group`. Every call but health needs a token when a token file is configured.
    """
    server = grpc.aio.server(
        options=server_options(settings.limits),
        maximum_concurrent_rpcs=settings.limits.max_concurrent_rpcs,
        interceptors=security.interceptors(settings.auth),
    )
    servicer = DepthEstimatorService(pool, settings.limits, frames)
    depth_pb2_grpc.add_DepthEstimatorServicer_to_server(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    certificates = security.Certificates(settings.tls) if settings.tls.enabled else None
    built = Server(server, health, servicer, pool, certificates=certificates)
    await built.set_health(NOT_SERVING, "", SERVICE_NAME, *(model_health_name(name) for name in pool.names))
    for address in settings.listen:
        if address.startswith("unix:"):
            path = security.prepare_socket_path(address)
            server.add_insecure_port(address)
            security.restrict_socket(path, settings.socket_group)
            built.addresses.append(address)
            continue
        port = server.add_secure_port(address, certificates.credentials()) if certificates else server.add_insecure_port(address)
        built.addresses.append(f"{address.rpartition(':')[0]}:{port}")
    for address in remote_addresses(settings):
        if not (settings.tls.enabled or settings.auth.token_file):
            logger.warning("listening on %s with neither TLS nor a token (allow_insecure_remote): anyone who can "
                           "reach it can use the daemon", address)
    return built


async def _within(awaitable, seconds: float) -> bool:
    """Await `awaitable` for at most `seconds`; whether it finished."""
    try:
        await asyncio.wait_for(awaitable, max(0.0, seconds))
    except asyncio.TimeoutError:
        return False
    return True
