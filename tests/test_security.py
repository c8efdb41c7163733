"""Who may use the daemon: tokens, TLS and mutual TLS, the socket's mode and group, refusing an
unprotected network address; and what an operator reads: journal priorities, a permission error
that says so, an installer that refuses a unit that cannot run."""

from __future__ import annotations

import grp
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import pytest
from daemon import DaemonThread, wait_for
from scenes import scene

from depthd.config import AuthSettings, ConfigError, ModelSettings, Settings, load_settings
from depthd.ops.cli import main as depthd_main
from depthd_client import DepthClient, DepthdError
from depthd_client.v1 import depth_pb2 as pb
from depthd_client.v1 import depth_pb2_grpc

TOKEN = "s3cret-token-for-tests"
SMALL = ((48, 64),)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"# robots\n{TOKEN}\n\nother-token\n")
    return path


@pytest.fixture(scope="module")
def guarded(tiny_models, token_file, tmp_path_factory):
    """A daemon that wants a token, on a TCP port and a unix socket of group `nogroup`."""
    socket = tmp_path_factory.mktemp("run") / "depthd.sock"
    settings = Settings(
        listen=("127.0.0.1:0", f"unix:{socket}"),
        models=(ModelSettings("rel", str(tiny_models["depth_anything"]), warmup_sizes=SMALL),),
        auth=AuthSettings(token_file=str(token_file)),
        socket_group="nogroup",
    )
    running = DaemonThread(settings)
    with grpc.insecure_channel(running.address) as channel:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(channel)
        for answer in stub.Watch(health_pb2.HealthCheckRequest(), timeout=60):
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                break
    running.socket = socket
    yield running
    assert running.stop() == 0


def estimate(address: str, metadata=()) -> pb.EstimateResponse:
    request = pb.EstimateRequest(image=pb.Image(raw=pb.RawImage(width=64, height=48, format=pb.PIXEL_FORMAT_RGB8,
                                                                data=scene(64, 48).tobytes())))
    with grpc.insecure_channel(address) as channel:
        return depth_pb2_grpc.DepthEstimatorStub(channel).Estimate(request, metadata=metadata, timeout=30)


def test_a_call_needs_one_of_the_tokens_and_health_needs_none(guarded, caplog):
    with caplog.at_level(logging.DEBUG):
        for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)]:
            with pytest.raises(grpc.RpcError) as refused:
                estimate(guarded.address, metadata)
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED, metadata
            assert TOKEN not in refused.value.details()
        assert estimate(guarded.address, (("authorization", f"Bearer {TOKEN}"),)).depth.width == 64
        assert estimate(guarded.address, (("authorization", "bearer other-token"),)).depth.width == 64
        with DepthClient(guarded.address) as client:
            assert client.health() == "SERVING"
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "refused /depthd.v1.DepthEstimator/Estimate" in logged
    assert TOKEN not in logged and "wrong" not in logged


def test_reflection_and_streams_need_the_token_too(guarded):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(guarded.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        asked = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.ServerReflectionInfo(asked, timeout=30))
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        answered = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                  metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=30))
        assert "depthd.v1.DepthEstimator" in {s.name for s in answered[0].list_services_response.service}
        with pytest.raises(grpc.RpcError) as refused:
            list(depth_pb2_grpc.DepthEstimatorStub(channel).EstimateStream(iter([pb.EstimateRequest()]), timeout=30))
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_a_changed_token_file_is_read_again(guarded, token_file):
    original = token_file.read_text()
    try:
        token_file.write_text("rotated-token\n")
        with pytest.raises(grpc.RpcError) as refused:
            estimate(guarded.address, (("authorization", f"Bearer {TOKEN}"),))
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert estimate(guarded.address, (("authorization", "Bearer rotated-token"),)).depth.width == 64
    finally:
        token_file.write_text(original)


def test_the_unix_socket_is_0660_with_its_group(guarded):
    info = guarded.socket.stat()
    assert oct(info.st_mode & 0o777) == "0o660"
    assert info.st_gid == grp.getgrnam("nogroup").gr_gid
    reply = estimate(f"unix://{guarded.socket}", (("authorization", f"Bearer {TOKEN}"),))
    assert reply.depth.width == 64


def test_a_symlink_at_the_socket_path_is_refused(tiny_models, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "depthd.sock").symlink_to(tmp_path / "elsewhere" / "target.sock")
    settings = Settings(listen=(f"unix:{tmp_path / 'depthd.sock'}",),
                        models=(ModelSettings("rel", str(tiny_models["depth_anything"]), warmup_sizes=SMALL),))
    with pytest.raises(OSError, match="is a symlink; refusing to create the socket through it"):
        DaemonThread(settings)
    assert not (tmp_path / "elsewhere" / "target.sock").exists()


def test_a_socket_in_the_units_runtime_folder_says_the_unit_makes_it(tiny_models):
    settings = Settings(listen=("unix:/run/depthd-no-such-folder/depthd.sock",),
                        models=(ModelSettings("rel", str(tiny_models["depth_anything"]), warmup_sizes=SMALL),))
    with pytest.raises(OSError, match=r"does not exist\. The systemd unit creates it \(RuntimeDirectory=depthd\)"):
        DaemonThread(settings)


# --- TLS -----------------------------------------------------------------------------------------


def serving(address: str, credentials: grpc.ChannelCredentials | None) -> bool:
    """Whether an Estimate over a fresh channel with these credentials (None: plaintext) is answered."""
    request = pb.EstimateRequest(image=pb.Image(raw=pb.RawImage(width=64, height=48, format=pb.PIXEL_FORMAT_RGB8,
                                                                data=scene(64, 48).tobytes())))
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            return depth_pb2_grpc.DepthEstimatorStub(channel).Estimate(request, timeout=10).depth.width == 64
        except grpc.RpcError as error:
            assert error.code() is grpc.StatusCode.UNAVAILABLE, error
            return False


def tls_daemon(tiny_models, **tls) -> DaemonThread:
    from depthd.config import TlsSettings

    settings = Settings(listen=("127.0.0.1:0",), tls=TlsSettings(**{k: str(v) for k, v in tls.items()}),
                        models=(ModelSettings("rel", str(tiny_models["depth_anything"]), warmup_sizes=SMALL),))
    running = DaemonThread(settings)
    wait_for(lambda: running.daemon.pool.ready, "the model to load")
    return running


def test_tls_and_mutual_tls(tiny_models, tmp_path):
    from certs import make_pki

    pki = make_pki(tmp_path / "pki")
    running = tls_daemon(tiny_models, cert=pki.server_cert, key=pki.server_key, client_ca=pki.ca)
    try:
        with_certificate = grpc.ssl_channel_credentials(pki.read("ca"), pki.read("client_key"), pki.read("client_cert"))
        assert serving(running.address, with_certificate)
        assert not serving(running.address, grpc.ssl_channel_credentials(pki.read("ca"))), "no client certificate"
        assert not serving(running.address, None), "plaintext"
        other = make_pki(tmp_path / "other", name="someone else")
        stranger = grpc.ssl_channel_credentials(pki.read("ca"), other.read("client_key"), other.read("client_cert"))
        assert not serving(running.address, stranger), "a client certificate from another CA"
    finally:
        assert running.stop() == 0


def test_certificates_rotate_without_a_restart(tiny_models, tmp_path):
    from certs import make_pki

    first, second = make_pki(tmp_path / "first", name="first"), make_pki(tmp_path / "second", name="second")
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(first.server_cert, live / "server.pem")
    shutil.copy(first.server_key, live / "server.key")
    running = tls_daemon(tiny_models, cert=live / "server.pem", key=live / "server.key")
    try:
        assert serving(running.address, grpc.ssl_channel_credentials(first.read("ca")))
        shutil.copy(second.server_cert, live / "server.pem")
        shutil.copy(second.server_key, live / "server.key")
        assert serving(running.address, grpc.ssl_channel_credentials(second.read("ca"))), "new connections: new cert"
        assert not serving(running.address, grpc.ssl_channel_credentials(first.read("ca")))
        running.daemon.reload()  # SIGHUP: read again even without a change
        assert serving(running.address, grpc.ssl_channel_credentials(second.read("ca")))
    finally:
        assert running.stop() == 0


# --- exposure ------------------------------------------------------------------------------------


def test_an_unprotected_network_address_is_refused_at_load_and_by_check_config(tmp_path, capsys):
    model = {"models": [{"name": "a", "source": "b"}]}
    for address in ("0.0.0.0:50051", "[::]:50051", "192.168.1.20:50051", "robot.local:50051"):
        with pytest.raises(ConfigError, match=r"neither TLS nor a token: set tls\.cert and tls\.key .* auth\.token_file"):
            load_settings(None, {}, {"listen": [address], **model})
    for address in ("127.0.0.1:50051", "[::1]:50051", "localhost:50051", "unix:/run/depthd/depthd.sock"):
        assert load_settings(None, {}, {"listen": [address], **model}).listen == (address,)
    config = tmp_path / "depthd.yaml"
    config.write_text("listen: ['0.0.0.0:50051']\nmodels: [{name: a, source: b}]\n")
    assert depthd_main(["check-config", str(config)]) == 2
    assert "can be reached from other machines" in capsys.readouterr().err


def test_allow_insecure_remote_starts_and_warns(tiny_models, caplog):
    settings = load_settings(None, {}, {
        "listen": ["0.0.0.0:0"], "allow_insecure_remote": True,
        "models": [{"name": "rel", "source": str(tiny_models["depth_anything"]), "warmup_sizes": [[48, 64]]}],
    })
    with caplog.at_level(logging.WARNING):
        running = DaemonThread(settings)
    try:
        assert any("with neither TLS nor a token (allow_insecure_remote)" in r.getMessage() for r in caplog.records)
    finally:
        assert running.stop() == 0


# --- what an operator reads ------------------------------------------------------------------


def test_log_lines_carry_their_syslog_priority_when_stderr_is_the_journal(tmp_path):
    log = tmp_path / "journal.log"
    with open(log, "w") as stderr:
        info = os.fstat(stderr.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}", "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, "-m", "depthd", "serve", "--model", f"x={tmp_path / 'missing'}",
                        "--listen", "127.0.0.1:0"], stderr=stderr, env=env, timeout=120)
    lines = log.read_text().splitlines()
    assert lines and all(line[:3] in ("<6>", "<4>", "<3>") for line in lines), lines
    assert any(line.startswith("<3>ERROR") and "no such folder" in line for line in lines)
    assert not any(line[3:7].isdigit() for line in lines), "a timestamp of its own: the journal has one"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to read the model as another user")
def test_a_model_file_the_service_may_not_read_says_permission_denied(tiny_models):
    from depthd.engine.engine import DepthEngine
    from depthd.errors import ModelLoadError

    DepthEngine.load(ModelSettings("warm", str(tiny_models["glpn"])))  # everything the load imports, imported
    top = Path(tempfile.mkdtemp())
    try:
        folder = top / "model"
        shutil.copytree(tiny_models["glpn"], folder)
        for path in (top, folder, *folder.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (folder / "model.safetensors").chmod(0o600)  # as a root-owned file copied into the cache
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # the service's user: not root
            os.setgid(65534)
            os.setuid(65534)
            try:
                DepthEngine.load(ModelSettings("cam", str(folder)))
                message = "loaded"
            except ModelLoadError as error:
                message = str(error)
            os.write(write, message.encode())
            os._exit(0)
        os.close(write)
        os.waitpid(child, 0)
        message = os.read(read, 10_000).decode()
    finally:
        shutil.rmtree(top)
    assert "permission denied reading" in message and "model.safetensors" in message
    assert "sudo chmod -R a+rX" in message


def test_install_service_refuses_a_daemon_the_service_cannot_reach(monkeypatch, capsys):
    from depthd.ops import install

    for place in ("/root/depthd/.venv", "/home/robot/depthd/.venv", "/tmp/depthd/.venv", "/root"):
        assert "Install depthd, and the Python it runs on, in /opt/depthd" in install.unreachable([Path(place)])
    assert install.unreachable([Path("/opt/depthd/.venv"), Path("/usr/bin/python3.11"), Path("/rooted/x")]) is None
    monkeypatch.setattr(install, "unreachable", lambda runtime: "it is under /root")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(install.InstallError, match="it is under /root"):
        install.install(Path("/"))
    assert install.install(Path("/"), dry_run=True) == 0  # shown, and warned about
    assert "WARNING: this unit cannot work: it is under /root" in capsys.readouterr().err


def test_the_unit_names_only_groups_that_exist(capsys, tmp_path):
    from depthd.ops.install import DEVICE_GROUPS, group_exists

    assert depthd_main(["install-service", "--dry-run", "--prefix", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("SupplementaryGroups="))
    assert line.split("=", 1)[1].split() == [g for g in DEVICE_GROUPS if group_exists(g)]
    assert "\nGroup=depthd\n" in out and "\nUser=depthd-daemon\n" in out
    for missing in (g for g in DEVICE_GROUPS if not group_exists(g)):
        assert f"no {missing!r} group on this system" in out


def test_the_client_without_a_token_gets_unauthenticated(guarded):
    with DepthClient(guarded.address) as client:
        with pytest.raises(DepthdError) as refused:
            client.models()
    assert refused.value.code is grpc.StatusCode.UNAUTHENTICATED
