"""The client's side of TLS, mTLS and tokens, against a small gRPC server of the test's own on a
loopback port (the standard health service and a fake DepthEstimator, behind an interceptor that
records each call's metadata), so it needs nothing of the daemon's own security: the token reaches
the server on every call, TLS and mTLS connect only with the right files, mistakes in the options are
ValueErrors that never show the token, and depthctl finds its token where it should."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from certs import Pki, make_pki
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from depthd_client import AsyncDepthClient, DepthClient, DepthdError, read_token_file
from depthd_client.channels import Connection
from depthd_client.cli import main as depthctl
from depthd_client.cli import resolve_token
from depthd_client.v1 import depth_pb2 as pb
from depthd_client.v1 import depth_pb2_grpc

TOKEN = "s3cret-Token_0123456789abcdef"
BEARER = f"Bearer {TOKEN}"
FRAME = b"\x89PNG not really: the fake server does not decode"
HEALTH = "/grpc.health.v1.Health/"
DEPTH = "/depthd.v1.DepthEstimator/"


class Recorder(grpc.ServerInterceptor):
    """Records (method, metadata) of every call the server receives."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()

    def intercept_service(self, continuation, handler_call_details):
        with self._lock:
            self.calls.append((handler_call_details.method, dict(handler_call_details.invocation_metadata or ())))
        return continuation(handler_call_details)

    def authorization(self) -> dict[str, set[str | None]]:
        """Each method called, and the authorization values it was called with."""
        seen: dict[str, set[str | None]] = {}
        with self._lock:
            for method, metadata in self.calls:
                seen.setdefault(method, set()).add(metadata.get("authorization"))
        return seen


class FakeEstimator(depth_pb2_grpc.DepthEstimatorServicer):
    """Answers each frame with its ids echoed and no depth; enough to carry metadata."""

    def Estimate(self, request: pb.EstimateRequest, context) -> pb.EstimateResponse:
        return pb.EstimateResponse(frame_id=request.frame_id, timestamp_ns=request.timestamp_ns, model="fake")

    def EstimateStream(self, request_iterator, context):
        for request in request_iterator:
            yield self.Estimate(request, context)

    def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[pb.ModelInfo(name="fake", is_default=True, ready=True)])


class Running:
    def __init__(self, port: int, recorder: Recorder, server: grpc.Server):
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.recorder = recorder
        self.server = server


@pytest.fixture
def serve() -> Iterator:
    """`serve(credentials=None)` starts a server on 127.0.0.1:0 (TLS with server credentials) and
    returns it running; every server started is stopped after the test."""
    started: list[grpc.Server] = []

    def start(credentials: grpc.ServerCredentials | None = None) -> Running:
        recorder = Recorder()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[recorder])
        health_servicer = health.HealthServicer()
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        depth_pb2_grpc.add_DepthEstimatorServicer_to_server(FakeEstimator(), server)
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        started.append(server)
        return Running(port, recorder, server)

    yield start
    for server in started:
        server.stop(None)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory) -> Pki:
    """A second CA that signed nothing the server holds."""
    return make_pki(tmp_path_factory.mktemp("other-pki"), name="someone else")


def server_credentials(pki: Pki, *, require_client_auth: bool = False) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(pki.read("server_key"), pki.read("server_cert"))],
        root_certificates=pki.read("ca") if require_client_auth else None,
        require_client_auth=require_client_auth,
    )


ALL_CALLS = {
    f"{HEALTH}Check", f"{HEALTH}Watch", f"{DEPTH}Estimate", f"{DEPTH}EstimateStream", f"{DEPTH}ListModels",
}


def every_call_sync(client: DepthClient) -> None:
    """One call of each kind the client makes."""
    client.wait_until_serving(10)
    assert client.health() == "SERVING"
    assert client.estimate(FRAME, frame_id=3).frame_id == 3
    assert [r.frame_id for r in client.stream([FRAME, FRAME])] == [0, 1]
    assert [m.name for m in client.models()] == ["fake"]


async def every_call_async(client: AsyncDepthClient) -> None:
    await client.wait_until_serving(10)
    assert await client.health() == "SERVING"
    assert (await client.estimate(FRAME, frame_id=3)).frame_id == 3
    assert [r.frame_id async for r in client.stream([FRAME, FRAME])] == [0, 1]
    assert [m.name for m in await client.models()] == ["fake"]


# --- tokens ----------------------------------------------------------------------------------------


def test_the_token_reaches_the_server_with_every_call_on_a_plaintext_port(serve):
    running = serve()
    with DepthClient(running.address, timeout=10, token=TOKEN) as client:
        every_call_sync(client)
    assert running.recorder.authorization() == {method: {BEARER} for method in ALL_CALLS}


def test_the_async_client_sends_the_token_with_every_call(serve):
    running = serve()

    async def main() -> None:
        async with AsyncDepthClient(running.address, timeout=10, token=TOKEN) as client:
            await every_call_async(client)

    asyncio.run(main())
    assert running.recorder.authorization() == {method: {BEARER} for method in ALL_CALLS}


def test_without_a_token_no_authorization_is_sent(serve):
    running = serve()
    with DepthClient(running.address, timeout=10) as client:
        every_call_sync(client)
    assert running.recorder.authorization() == {method: {None} for method in ALL_CALLS}


def test_the_token_goes_with_the_calls_on_a_channel_of_your_own(serve):
    running = serve()
    with DepthClient(channel=grpc.insecure_channel(running.address), token=TOKEN) as client:
        assert client.health() == "SERVING"
        client.models()
    assert running.recorder.authorization() == {f"{HEALTH}Check": {BEARER}, f"{DEPTH}ListModels": {BEARER}}


def test_a_token_that_cannot_be_a_header_is_refused_without_showing_it():
    for bad in ("two words", "line\nbreak", "tab\there", "caf\u00e9-token", ""):
        with pytest.raises(ValueError, match="token") as refused:
            DepthClient("127.0.0.1:1", token=bad)
        assert bad not in str(refused.value) or bad == ""
    with pytest.raises(TypeError, match="str"):
        DepthClient("127.0.0.1:1", token=TOKEN.encode())  # type: ignore[arg-type]


def test_the_token_is_in_no_repr():
    client = DepthClient("127.0.0.1:1", token=TOKEN)
    try:
        assert TOKEN not in repr(client) and TOKEN not in str(vars(client).keys())
    finally:
        client.close()
    connection = Connection("127.0.0.1:1", token=TOKEN)
    assert TOKEN not in repr(connection) and "token=set" in repr(connection)


def test_a_token_is_sent_on_a_unix_socket_too(tmp_path):
    socket = f"unix:{tmp_path / 'd.sock'}"
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[recorder])
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(socket)
    server.start()
    try:
        with DepthClient(socket, timeout=10, token=TOKEN) as client:
            assert client.health() == "SERVING"
    finally:
        server.stop(None)
    assert recorder.authorization() == {f"{HEALTH}Check": {BEARER}}


# --- TLS and mTLS ----------------------------------------------------------------------------------


def test_tls_with_the_ca_connects_by_ip_and_by_name(serve, pki):
    running = serve(server_credentials(pki))
    for target in (running.address, f"localhost:{running.port}"):
        with DepthClient(target, timeout=10, tls_ca=pki.ca, token=TOKEN) as client:
            every_call_sync(client)
    assert running.recorder.authorization() == {method: {BEARER} for method in ALL_CALLS}


def test_the_async_client_speaks_tls_too(serve, pki):
    running = serve(server_credentials(pki, require_client_auth=True))

    async def main() -> None:
        async with AsyncDepthClient(
            running.address, timeout=10, tls_ca=str(pki.ca), tls_cert=pki.client_cert, tls_key=pki.client_key
        ) as client:
            await every_call_async(client)
        async with AsyncDepthClient(running.address, timeout=5, tls_ca=pki.ca) as client:
            with pytest.raises(DepthdError) as refused:
                await client.health()
        assert refused.value.code is grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())


def test_without_the_ca_a_client_cannot_connect(serve, pki, other_pki):
    running = serve(server_credentials(pki))
    for client in (
        DepthClient(running.address, timeout=5),  # plaintext to a TLS port
        DepthClient(running.address, timeout=5, tls_ca=other_pki.ca),  # a CA that did not sign the server
        DepthClient(running.address, timeout=5, tls_cert=pki.client_cert, tls_key=pki.client_key),  # default roots
    ):
        with client, pytest.raises(DepthdError) as refused:
            client.health()
        assert refused.value.code is grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_client_without_a_certificate_and_takes_one_with_it(serve, pki, other_pki):
    running = serve(server_credentials(pki, require_client_auth=True))
    with DepthClient(running.address, timeout=10, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key,
                     token=TOKEN) as client:
        every_call_sync(client)
    assert running.recorder.authorization() == {method: {BEARER} for method in ALL_CALLS}
    for client in (
        DepthClient(running.address, timeout=5, tls_ca=pki.ca),  # no client certificate
        DepthClient(running.address, timeout=5, tls_ca=pki.ca, tls_cert=other_pki.client_cert,
                    tls_key=other_pki.client_key),  # one the server's CA did not sign
    ):
        with client, pytest.raises(DepthdError) as refused:
            client.models()
        assert refused.value.code is grpc.StatusCode.UNAVAILABLE


# --- mistakes in the options ----------------------------------------------------------------------


@pytest.mark.parametrize("make", [DepthClient, AsyncDepthClient], ids=["sync", "async"])
def test_mistakes_in_the_tls_options_are_value_errors(make, pki, tmp_path):
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        make("127.0.0.1:1", tls_ca=pki.ca, tls_cert=pki.client_cert)
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        make("127.0.0.1:1", tls_key=pki.client_key)
    for target in ("unix:///run/depthd/depthd.sock", "unix:/run/depthd/depthd.sock", "unix-abstract:depthd"):
        with pytest.raises(ValueError, match="unix sockets are plaintext, guarded by their file permissions"):
            make(target, tls_ca=pki.ca, token=TOKEN)
    with pytest.raises(ValueError, match="own credentials"):
        make("127.0.0.1:1", channel=object(), tls_ca=pki.ca)
    not_pem = tmp_path / "ca.der"
    not_pem.write_bytes(b"\x30\x82\x01\x0a")
    with pytest.raises(ValueError, match="not a PEM file"):
        make("127.0.0.1:1", tls_ca=not_pem)
    with pytest.raises(FileNotFoundError, match="tls_ca") as missing:
        make("127.0.0.1:1", tls_ca=tmp_path / "nowhere.pem")
    assert missing.value.filename == str(tmp_path / "nowhere.pem")


def test_a_token_alone_needs_no_tls_on_a_unix_target():
    connection = Connection("unix:///run/depthd/depthd.sock", token=TOKEN)
    assert connection.credentials is None and connection.metadata == (("authorization", BEARER),)


# --- depthctl ----------------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_read_token_file_takes_the_first_non_empty_line(tmp_path):
    assert read_token_file(write(tmp_path / "t", f"\n  \n  {TOKEN}  \nsecond-token\n")) == TOKEN
    assert read_token_file(write(tmp_path / "daemon's", f"# robot-01, rotated 2026-05\n{TOKEN}\n")) == TOKEN
    with pytest.raises(ValueError, match="holds no token"):
        read_token_file(write(tmp_path / "empty", "\n \n"))
    with pytest.raises(ValueError, match="printable ASCII") as refused:
        read_token_file(write(tmp_path / "spaced", "two words\n"))
    assert "two words" not in str(refused.value)
    with pytest.raises(FileNotFoundError, match="token file"):
        read_token_file(tmp_path / "nowhere")


def test_depthctl_token_precedence(tmp_path):
    from_flag = write(tmp_path / "flag", "from-flag\n")
    from_env_file = write(tmp_path / "env", "from-env-file\n")
    both = {"DEPTHD_TOKEN_FILE": str(from_env_file), "DEPTHD_TOKEN": "from-env"}
    assert resolve_token(str(from_flag), both) == "from-flag"
    assert resolve_token(None, both) == "from-env-file"
    assert resolve_token(None, {"DEPTHD_TOKEN": " from-env\n"}) == "from-env"
    assert resolve_token(None, {"DEPTHD_TOKEN_FILE": "", "DEPTHD_TOKEN": "from-env"}) == "from-env"
    assert resolve_token(None, {"DEPTHD_TOKEN": ""}) is None
    assert resolve_token(None, {}) is None
    with pytest.raises(FileNotFoundError):  # a file named but missing is an error, not a fall-back
        resolve_token(None, {"DEPTHD_TOKEN_FILE": str(tmp_path / "nowhere"), "DEPTHD_TOKEN": "from-env"})


def test_depthctl_sends_the_token_and_speaks_tls(serve, pki, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DEPTHD_TOKEN", raising=False)
    monkeypatch.delenv("DEPTHD_TOKEN_FILE", raising=False)
    running = serve(server_credentials(pki, require_client_auth=True))
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    token_file = write(tmp_path / "token", f"{TOKEN}\n")

    assert depthctl(["--target", running.address, *tls, "--token-file", str(token_file), "health"]) == 0
    monkeypatch.setenv("DEPTHD_TARGET", running.address)  # the target from the environment still works
    monkeypatch.setenv("DEPTHD_TOKEN", "from-env")
    assert depthctl([*tls, "models"]) == 0
    assert capsys.readouterr().out.startswith("SERVING\nfake\t")
    assert running.recorder.authorization() == {f"{HEALTH}Check": {BEARER}, f"{DEPTH}ListModels": {"Bearer from-env"}}

    assert depthctl(["--tls-ca", str(pki.ca), "health"]) == 1  # mTLS: no client certificate, no connection
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and "--tls-cert" in err  # with a hint at the TLS options


def test_depthctl_says_what_is_wrong_with_its_files_and_exits_2(pki, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DEPTHD_TOKEN", raising=False)
    monkeypatch.delenv("DEPTHD_TOKEN_FILE", raising=False)
    unreadable = tmp_path / "a-folder"
    unreadable.mkdir()
    cases = [
        (["--token-file", str(tmp_path / "nowhere"), "health"], "cannot read the token file"),
        (["--token-file", str(unreadable), "health"], "cannot read the token file"),
        (["--token-file", str(write(tmp_path / "empty", "\n")), "health"], "holds no token"),
        (["--tls-cert", str(pki.client_cert), "health"], "tls_cert and tls_key"),
        (["--tls-ca", str(tmp_path / "nowhere.pem"), "health"], "cannot read tls_ca"),
        (["--target", "unix:///run/depthd/depthd.sock", "--tls-ca", str(pki.ca), "health"], "unix sockets are plaintext"),
    ]
    for argv, said in cases:
        assert depthctl(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("depthctl: ") and said in err and "Traceback" not in err, err
    monkeypatch.setenv("DEPTHD_TOKEN_FILE", str(tmp_path / "nowhere"))
    assert depthctl(["health"]) == 2
    assert "cannot read the token file" in capsys.readouterr().err


def test_depthctl_names_the_fix_for_unauthenticated(serve, monkeypatch, capsys):
    """A server that refuses every call without the right token, as the daemon will."""

    class Refuse(grpc.ServerInterceptor):
        def intercept_service(self, continuation, handler_call_details):
            metadata = dict(handler_call_details.invocation_metadata or ())
            if metadata.get("authorization") == BEARER:
                return continuation(handler_call_details)

            def deny(request, context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid token is required")

            return grpc.unary_unary_rpc_method_handler(deny)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[Refuse()])
    depth_pb2_grpc.add_DepthEstimatorServicer_to_server(FakeEstimator(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.delenv("DEPTHD_TOKEN_FILE", raising=False)
    try:
        monkeypatch.setenv("DEPTHD_TOKEN", "wrong")
        assert depthctl(["--target", f"127.0.0.1:{port}", "models"]) == 1
        err = capsys.readouterr().err
        assert "UNAUTHENTICATED" in err and "--token-file" in err and "wrong" not in err
        monkeypatch.setenv("DEPTHD_TOKEN", TOKEN)
        assert depthctl(["--target", f"127.0.0.1:{port}", "models"]) == 0
    finally:
        server.stop(None)
