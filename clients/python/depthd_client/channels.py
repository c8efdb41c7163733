"""How a client reaches the daemon: the channel it opens (plaintext or TLS, with its options) and the
metadata every call carries (a bearer token). `DepthClient` and `AsyncDepthClient` both take their
channel and their calls' metadata from one `Connection`, built here from the same keywords.

TLS is for TCP targets only: a unix socket stays plaintext, guarded by its file permissions. A token
goes into each call's metadata (`authorization: Bearer <token>`), not into channel credentials, so it
is sent on a plaintext channel too (a unix socket, a loopback port), and on a channel of your own.
No token ever appears in an exception message or a repr.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple, Union

import grpc
import grpc.aio

from depthd_client.messages import MAX_MESSAGE_BYTES_CEILING

__all__ = ["CHANNEL_OPTIONS", "Connection", "read_token_file"]

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES_CEILING),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES_CEILING),
)
"""The options of a channel the client opens itself, sync or asyncio, plaintext or TLS."""

PathLike = Union[str, "os.PathLike[str]"]
Metadata = Optional[Tuple[Tuple[str, str], ...]]

_UNIX_PREFIXES = ("unix:", "unix-abstract:")


class Connection:
    """Where the daemon is and how to reach it: `target`, the TLS credentials of the channel the client
    opens (`credentials`, None for plaintext) and the metadata each call sends (`metadata`, None
    without a token). The arguments are checked and the PEM files read here, once, so a mistake is
    raised by the client's constructor, not by its first call.

    - `tls_ca`: a PEM file of the CA that signed the daemon's certificate. It turns TLS on.
    - `tls_cert`, `tls_key`: PEM files of a client certificate and its private key, for a daemon that
      asks for one (mTLS); both or neither. Without `tls_ca` they turn TLS on too, and the daemon's
      certificate is checked against gRPC's default roots.
    - `token`: sent as `authorization: Bearer <token>` with every call.
    - `own_channel`: the client was given a channel; TLS options are then an error (give that channel
      its credentials), a token is still sent with each call.
    """

    __slots__ = ("target", "credentials", "metadata")

    def __init__(
        self,
        target: str,
        *,
        tls_ca: PathLike | None = None,
        tls_cert: PathLike | None = None,
        tls_key: PathLike | None = None,
        token: str | None = None,
        own_channel: bool = False,
    ):
        self.target = target
        self.credentials = _credentials(target, tls_ca, tls_cert, tls_key, own_channel)
        self.metadata: Metadata = None if token is None else (("authorization", f"Bearer {_checked(token)}"),)

    def channel(self) -> grpc.Channel:
        """A new sync channel to the target."""
        if self.credentials is None:
            return grpc.insecure_channel(self.target, options=list(CHANNEL_OPTIONS))
        return grpc.secure_channel(self.target, self.credentials, options=list(CHANNEL_OPTIONS))

    def aio_channel(self) -> grpc.aio.Channel:
        """A new asyncio channel to the target; open it inside the event loop that uses it."""
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.target, options=list(CHANNEL_OPTIONS))
        return grpc.aio.secure_channel(self.target, self.credentials, options=list(CHANNEL_OPTIONS))

    def __repr__(self) -> str:
        token = "set" if self.metadata else "none"
        return f"Connection({self.target!r}, tls={self.credentials is not None}, token={token})"


def read_token_file(path: PathLike) -> str:
    """The token in a file: its first non-empty line, without surrounding whitespace; lines starting
    with # are comments, as in the daemon's auth.token_file, so a client may be given a copy of that
    file. OSError when the file cannot be read, ValueError when it holds no usable token; neither
    message holds the file's text."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise type(error)(error.errno, f"cannot read the token file: {error.strerror}", str(path)) from None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"token file {path}: not ASCII text") from None
    for line in text.splitlines():
        if line.strip() and not line.strip().startswith("#"):
            return _checked(line.strip(), f"token file {path}")
    raise ValueError(f"token file {path} holds no token (its first non-empty line, not a # comment, is the token)")


def _checked(token: str, what: str = "token") -> str:
    """The token, if it can travel as a header value: a non-empty str of printable ASCII without spaces.
    The error says what is wrong, never what the token is."""
    if not isinstance(token, str):
        raise TypeError(f"{what} must be a str, got {type(token).__name__}")
    if not token:
        raise ValueError(f"{what} is empty")
    if not all("!" <= char <= "~" for char in token):
        raise ValueError(f"{what} must be printable ASCII without spaces or line breaks ({len(token)} characters given)")
    return token


def _credentials(
    target: str, tls_ca: PathLike | None, tls_cert: PathLike | None, tls_key: PathLike | None, own_channel: bool
) -> grpc.ChannelCredentials | None:
    if tls_ca is None and tls_cert is None and tls_key is None:
        return None
    if own_channel:
        raise ValueError(
            "tls_ca, tls_cert and tls_key set up the channel the client opens itself; "
            "with channel=, give that channel its own credentials"
        )
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together: give both (a client certificate and its private key) or neither")
    if target.startswith(_UNIX_PREFIXES):
        raise ValueError(
            f"TLS needs a TCP target (host:port), not {target}: unix sockets are plaintext, guarded by their "
            "file permissions; leave tls_ca, tls_cert and tls_key out for a unix socket"
        )
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(tls_ca, "tls_ca"),
        private_key=_pem(tls_key, "tls_key"),
        certificate_chain=_pem(tls_cert, "tls_cert"),
    )


def _pem(path: PathLike | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise type(error)(error.errno, f"cannot read {what}: {error.strerror}", str(path)) from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} {path} is not a PEM file (no -----BEGIN line)")
    return data
