"""Who may use the daemon: TLS (and mutual TLS) on TCP, bearer tokens on every call but health,
and unix sockets only their group can open.

Certificates and tokens are files that change under a running daemon (rotation): both are
read again when their files change, and the certificates on SIGHUP too, for the connections
and calls that follow; those already open keep what they had. A token is never logged.
"""

from __future__ import annotations

import grp
import hmac
import logging
import os
import stat
import threading
from pathlib import Path

import grpc

from depthd.config import AuthSettings, TlsSettings
from depthd.server.status import RateLimited

logger = logging.getLogger(__name__)

OPEN_SERVICES = ("/grpc.health.v1.Health/",)
"""Methods anyone may call without a token, so that supervisors and load balancers can probe."""
SOCKET_MODE = 0o660

refused_tokens = RateLimited(logger, logging.WARNING, per_minute=20)


class _WatchedFiles:
    """Files read again when their modification time, size or inode changes."""

    def __init__(self, *paths: str):
        self.paths = [Path(p) for p in paths]
        self._seen: tuple | None = None

    def changed(self) -> bool:
        state = tuple(_signature(path) for path in self.paths)
        if state == self._seen:
            return False
        self._seen = state
        return True


def _signature(path: Path) -> tuple:
    try:
        info = path.stat()
    except OSError:
        return (None,)
    return info.st_mtime_ns, info.st_size, info.st_ino


class Certificates:
    """The server's TLS material, handed to gRPC as dynamic credentials: gRPC asks for it at every
    handshake, and gets new material after the files changed or SIGHUP asked for a reload."""

    def __init__(self, tls: TlsSettings):
        self.tls = tls
        self._files = _WatchedFiles(*(p for p in (tls.cert, tls.key, tls.client_ca) if p))
        self._reload = threading.Event()
        self._files.changed()
        self.current = self._configuration()

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.current, self._fetch, require_client_authentication=self.tls.client_ca is not None
        )

    def reload(self) -> None:
        """Read the files again before the next handshake (SIGHUP)."""
        self._reload.set()

    def _fetch(self):
        """Called by gRPC before each handshake: new material, or None to keep the current one."""
        if not (self._files.changed() or self._reload.is_set()):
            return None
        self._reload.clear()
        try:
            self.current = self._configuration()
        except OSError as error:
            logger.error("cannot read the TLS files again (%s); keeping the ones loaded before", error)
            return None
        logger.info("TLS certificate read again from %s", self.tls.cert)
        return self.current

    def _configuration(self):
        key, cert = Path(self.tls.key).read_bytes(), Path(self.tls.cert).read_bytes()
        client_ca = Path(self.tls.client_ca).read_bytes() if self.tls.client_ca else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)


class Tokens:
    """The accepted bearer tokens, one per line of the token file (blank lines and # comments
    ignored), read again when the file changes."""

    def __init__(self, path: str):
        self.path = path
        self._files = _WatchedFiles(path)
        self._lock = threading.Lock()
        self._tokens: list[bytes] = []
        self._read()

    def accepts(self, presented: str | None) -> bool:
        """Whether `presented` is one of the tokens; compared in constant time with every one."""
        with self._lock:
            if self._files.changed():
                self._read()
            tokens = self._tokens
        candidate = (presented or "").encode()
        matches = [hmac.compare_digest(candidate, token) for token in tokens]
        return presented is not None and any(matches)

    def _read(self) -> None:
        try:
            lines = Path(self.path).read_text().splitlines()
        except OSError as error:
            logger.error("cannot read the token file %s (%s): every call needing a token is refused", self.path,
                         error.strerror)
            self._tokens = []
            return
        self._tokens = [line.strip().encode() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not self._tokens:
            logger.warning("the token file %s holds no token: every call needing one is refused", self.path)


class TokenCheck(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for a call without a valid `authorization: Bearer <token>`, health excepted."""

    def __init__(self, tokens: Tokens):
        self.tokens = tokens

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        presented = _bearer(details.invocation_metadata)
        if self.tokens.accepts(presented):
            return handler
        reason = "no token" if presented is None else "a token that is not valid"
        refused_tokens.log("refused %s: %s", details.method, reason)
        return _refusing(handler, f"{reason}: send the metadata `authorization: Bearer <token>` with a token of the "
                                  "daemon's auth.token_file")


def _bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
            return value[7:].strip()
    return None


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call UNAUTHENTICATED."""

    async def refuse(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # an async generator, as a streaming handler must be

    codec = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **codec)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **codec)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **codec)
    return grpc.unary_unary_rpc_method_handler(refuse, **codec)


def interceptors(auth: AuthSettings) -> list[grpc.aio.ServerInterceptor]:
    return [TokenCheck(Tokens(auth.token_file))] if auth.token_file else []


class SocketError(OSError):
    """A unix socket cannot be made where it was asked for; the message says why and what to do."""


def prepare_socket_path(address: str) -> Path:
    """Check the folder of a `unix:` address before binding; refuse a symlink at the path."""
    path = Path(address[len("unix:"):])
    folder = path.parent
    if not folder.is_dir():
        hint = (
            " The systemd unit creates it (RuntimeDirectory=depthd); outside systemd, listen on a socket in a "
            "folder of yours (--listen unix:$XDG_RUNTIME_DIR/depthd.sock) or on 127.0.0.1:50051"
            if str(folder).startswith("/run/") else ""
        )
        raise SocketError(f"cannot listen on {address}: the folder {folder} does not exist.{hint}")
    if path.is_symlink():
        raise SocketError(f"cannot listen on {address}: {path} is a symlink; refusing to create the socket through it")
    if path.exists() and not stat.S_ISSOCK(path.lstat().st_mode):
        raise SocketError(f"cannot listen on {address}: {path} exists and is not a socket")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SocketError(f"cannot listen on {address}: {folder} is not writable by this user (permission denied)")
    return path


def restrict_socket(path: Path, group: str | None) -> None:
    """The socket only its owner and group can open: mode 0660, group `group` (or the process's).

    Under the unit the group is already the process's own (Group=depthd), and chown is not
    even allowed (SystemCallFilter=~@privileged): the group is changed only where it differs."""
    if group is not None:
        gid = grp.getgrnam(group).gr_gid
        if path.lstat().st_gid != gid:
            os.chown(path, -1, gid, follow_symlinks=False)
    os.chmod(path, SOCKET_MODE)
