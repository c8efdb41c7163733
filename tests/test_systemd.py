"""Life under systemd: the unit, sd_notify (READY, STATUS, WATCHDOG, STOPPING), the drain, the installer."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from daemon import wait_for
from scenes import scene
from slow_daemon import BUSY_WIDTH, HANG_WIDTH, SLOW_WIDTH

from depthd.ops.cli import main as depthd_main
from depthd.ops.systemd import Notifier
from depthd_client import DepthClient, DepthdError

TESTS = Path(__file__).resolve().parent
needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")


class Notifications:
    """The receiving end of NOTIFY_SOCKET, as systemd holds it: (time, assignment) pairs."""

    def __init__(self, path: str):
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(path)
        self.received: list[tuple[float, str]] = []

    def receive(self, timeout: float) -> list[str] | None:
        self.socket.settimeout(timeout)
        try:
            data = self.socket.recv(4096)
        except socket.timeout:
            return None
        lines = data.decode().split("\n")
        self.received += [(time.monotonic(), line) for line in lines]
        return lines

    def wait_for(self, assignment: str, timeout: float) -> float:
        """Read until `assignment` arrives; its arrival time."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            lines = self.receive(left)
            if lines and assignment in lines:
                return time.monotonic()
        raise AssertionError(f"no {assignment} within {timeout} s; got {[line for _, line in self.received]}")

    def collect(self, seconds: float) -> list[tuple[float, str]]:
        start = len(self.received)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.receive(left)
        return self.received[start:]


def start_daemon(tiny_models, tmp_path, watchdog_usec: int = 1_000_000, listen: str | None = None,
                 preexec_fn=None, **environment: str):
    notifications = Notifications(str(tmp_path / "notify.sock"))
    socket_path = tmp_path / "depthd.sock"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
        "WATCHDOG_USEC": str(watchdog_usec),
        "DEPTHD_STREAM_WINDOW": "8",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        **environment,
    }
    process = subprocess.Popen(
        [sys.executable, str(TESTS / "slow_daemon.py"), "serve", "--model", f"tiny={tiny_models['depth_anything']}",
         "--listen", listen or f"unix:{socket_path}"],
        env=env, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn,
    )
    return process, notifications, listen or f"unix://{socket_path}"


def test_ready_watchdog_and_a_drain_that_answers_every_frame(tiny_models, tmp_path):
    process, notifications, target = start_daemon(tiny_models, tmp_path)
    try:
        notifications.wait_for("READY=1", timeout=120)
        with DepthClient(target) as client:
            assert client.health() == "SERVING"  # READY=1 comes only once health says so
        lines = [line for _, line in notifications.received]
        assert "STATUS=loading tiny (1/1)" in lines
        assert lines.index("STATUS=loading tiny (1/1)") < lines.index("READY=1")

        pings = [t for t, line in notifications.collect(2.6) if line == "WATCHDOG=1"]
        gaps = np.diff(pings)
        # every WATCHDOG_USEC / 2, and never a gap systemd would kill for (WATCHDOG_USEC)
        assert len(pings) >= 4 and gaps.min() > 0.25 and gaps.max() < 1.0, gaps

        frames = [scene(SLOW_WIDTH, 64, seed=i) for i in range(6)]
        results = []
        with DepthClient(target) as client:
            for result in client.stream(frames):
                results.append(result)
                if len(results) == 1:
                    process.send_signal(signal.SIGTERM)
        notifications.wait_for("STOPPING=1", timeout=10)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert [r.frame_id for r in results] == list(range(6))
    assert all(r.ok for r in results), [r.error for r in results]


def test_a_hung_forward_pass_stops_the_pings_and_a_second_signal_exits_at_once(tiny_models, tmp_path):
    process, notifications, target = start_daemon(tiny_models, tmp_path)
    try:
        notifications.wait_for("READY=1", timeout=120)
        notifications.wait_for("WATCHDOG=1", timeout=5)
        client = DepthClient(target, timeout=60)
        threading.Thread(target=lambda: _ignore_errors(client.estimate, scene(HANG_WIDTH, 64)), daemon=True).start()
        hung_at = time.monotonic()
        pings = [t for t, line in notifications.collect(3.0) if line == "WATCHDOG=1"]
        # one ping may still be earned by the progress made before the hang; none after
        assert all(t < hung_at + 1.5 for t in pings), [round(t - hung_at, 2) for t in pings]

        process.send_signal(signal.SIGTERM)
        notifications.wait_for("STOPPING=1", timeout=10)
        assert process.poll() is None  # draining: it waits for the hung frame
        process.send_signal(signal.SIGTERM)
        assert process.wait(5) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
    assert "withholding the watchdog ping" in process.stderr.read()


def test_sigterm_during_a_forward_pass_longer_than_the_grace_exits_0_and_answers_unavailable(tiny_models, tmp_path):
    """Torch still computing when the grace ends: the frame is answered UNAVAILABLE, the process exits 0
    just after the grace (it used to abort: "terminate called without an active exception", SIGABRT)."""
    process, notifications, target = start_daemon(tiny_models, tmp_path, DEPTHD_DRAIN_GRACE_S="1")
    answers = []
    try:
        notifications.wait_for("READY=1", timeout=120)
        with DepthClient(target, timeout=60) as client:
            call = threading.Thread(target=lambda: answers.append(_code_of(client.estimate, scene(BUSY_WIDTH, 64))))
            call.start()
            wait_for(lambda: client.models()[0].queue_depth == 0 and client.models()[0].bytes_held > 0,
                        "the frame to be in its forward pass")
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = process.wait(30)
            took = time.monotonic() - signalled
            call.join(30)
    finally:
        if process.poll() is None:
            process.kill()
    log = process.stderr.read()
    assert code == 0, log[-2000:]
    assert took < 1 + 3, took
    assert answers == [grpc.StatusCode.UNAVAILABLE]
    assert "terminate called" not in log and "answered UNAVAILABLE" in log


def test_connections_past_the_open_file_limit_are_said_in_the_log(tiny_models, tmp_path):
    """Each connection is a file descriptor: the daemon takes the hard limit, and warns as it runs out."""
    import resource

    limit = 160
    port = _free_port()
    process, notifications, target = start_daemon(
        tiny_models, tmp_path, listen=f"127.0.0.1:{port}",
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (100, limit)),
    )
    idle = []
    try:
        notifications.wait_for("READY=1", timeout=120)
        soft = _soft_limit_of(process.pid)
        for _ in range(limit):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        notifications.collect(3.0)  # the daemon checks every 2 s
        for connection in idle:
            connection.close()
        with DepthClient(target, timeout=30) as client:
            wait_for(lambda: _served(client), "a client to be served again once the idle connections are gone")
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert soft == limit, "the soft limit was not raised to the hard one"
    assert "file descriptors exhausted" in process.stderr.read()


def _served(client) -> bool:
    try:
        return client.estimate(scene(64, 48), timeout=5).ok
    except DepthdError:
        return False


def _soft_limit_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-file limit in /proc")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _code_of(call, *args):
    try:
        call(*args)
        return grpc.StatusCode.OK
    except DepthdError as error:
        return error.code


def _ignore_errors(call, *args):
    try:
        call(*args)
    except DepthdError:
        pass


def test_draining_refuses_new_calls_and_answers_those_received(tiny_models):
    from daemon import DaemonThread

    from depthd.config import ModelSettings, Settings

    settings = Settings(listen=("127.0.0.1:0",), models=(
        ModelSettings("tiny", str(tiny_models["depth_anything"]), warmup_sizes=((48, 64),), max_batch=1),))
    running = DaemonThread(settings)
    with DepthClient(running.address) as client:
        client.wait_until_serving(60)
        model = running.daemon.pool.engine().checkpoint.model
        forward, release = model.forward, threading.Event()
        model.forward = lambda *a, **k: (release.wait(30), forward(*a, **k))[1]
        results, ended = [], []

        def consume():
            try:
                for result in client.stream([scene(64, 48)] * 3):
                    results.append(result)
            except DepthdError as error:  # the drain may come before the client's end of stream
                ended.append(error.code)

        reader = threading.Thread(target=consume)
        reader.start()
        wait_for(lambda: client.models()[0].queue_depth >= 2, "the stream's frames to wait behind the first")
        running.daemon.request_stop()
        wait_for(lambda: client.health() != "SERVING", "health to leave SERVING")
        with pytest.raises(DepthdError) as caught:
            client.estimate(scene(64, 48))
        assert caught.value.code is grpc.StatusCode.UNAVAILABLE
        release.set()
        reader.join(30)
    assert running.stop() == 0
    assert [r.ok for r in results] == [True, True, True]
    assert ended in ([], [grpc.StatusCode.UNAVAILABLE])


def test_the_watchdog_outlives_a_failure_to_judge_the_workers(tiny_models, tmp_path):
    from daemon import DaemonThread

    from depthd.config import ModelSettings, Settings

    notifications = Notifications(str(tmp_path / "notify.sock"))
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "600000"})
    settings = Settings(listen=("127.0.0.1:0",), models=(
        ModelSettings("tiny", str(tiny_models["depth_anything"]), warmup_sizes=((48, 64),)),))
    running = DaemonThread(settings, notifier=notifier)
    try:
        notifications.wait_for("READY=1", timeout=60)
        pool, judged = running.daemon.pool, []
        real = pool.stalled

        def flaky(within):
            judged.append(within)
            if len(judged) == 1:
                raise RuntimeError("dictionary changed size during iteration")
            return real(within)

        pool.stalled = flaky
        pings = [t for t, line in notifications.collect(2.0) if line == "WATCHDOG=1"]
    finally:
        assert running.stop() == 0
    assert len(judged) >= 3 and len(pings) >= 2, (judged, pings)


def test_stopping_leaves_the_event_loop_free_while_the_workers_stop(tiny_models):
    import asyncio

    from daemon import DaemonThread

    from depthd.config import ModelSettings, Settings
    from depthd.serving.pool import ModelPool

    closing, release = threading.Event(), threading.Event()

    class SlowToClose(ModelPool):
        def close(self, timeout=None):
            closing.set()
            release.wait(30)
            return super().close(timeout)

    settings = Settings(listen=("127.0.0.1:0",), models=(
        ModelSettings("tiny", str(tiny_models["depth_anything"]), warmup_sizes=((48, 64),)),))
    pool = SlowToClose(settings)
    running = DaemonThread(settings, pool)
    with DepthClient(running.address) as client:
        client.wait_until_serving(60)
    stopping = threading.Thread(target=running.stop)
    stopping.start()
    try:
        assert closing.wait(30)
        # the workers are being stopped; the event loop still runs (signals, the second SIGTERM)
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), running.daemon.loop).result(timeout=5)
    finally:
        release.set()
        stopping.join(30)
    assert running.exit_code == 0


def test_notifier_speaks_to_abstract_sockets_and_is_silent_outside_systemd():
    name = f"depthd-test-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name)
    listener.settimeout(5)
    notifier = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())})
    notifier.ready("serving")
    assert listener.recv(100) == b"READY=1\nSTATUS=serving"
    assert notifier.watchdog_interval == 4.0
    assert Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    silent = Notifier({})
    silent.ready("serving")  # no socket: nothing happens, nothing raises
    assert not silent.enabled


# --- the unit and the installer ------------------------------------------------------------------


def _rendered_unit(capsys, tmp_path) -> Path:
    assert depthd_main(["install-service", "--dry-run", "--prefix", str(tmp_path / "root")]) == 0
    out = capsys.readouterr().out
    unit = re.search(r"^# \S+depthd\.service\n(.*?)(?=^# \S+depthd\.yaml)", out, re.S | re.M).group(1)
    path = tmp_path / "depthd.service"
    path.write_text(unit)
    return path


@needs_systemd_analyze
def test_the_rendered_unit_verifies_and_is_hardened(capsys, tmp_path):
    unit = _rendered_unit(capsys, tmp_path)
    assert f"ExecStart={Path(sys.executable).parent / 'depthd'} serve --config /etc/depthd/depthd.yaml" in unit.read_text()
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                              capture_output=True, text=True, timeout=60)
    exposure = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout).group(1))
    assert exposure <= 2.0, security.stdout


def test_install_keeps_an_existing_config_and_uninstall_removes_what_it_wrote(tmp_path, capsys):
    root = tmp_path / "root"
    assert depthd_main(["install-service", "--prefix", str(root)]) == 0
    unit, config = root / "etc/systemd/system/depthd.service", root / "etc/depthd/depthd.yaml"
    assert "Type=notify" in unit.read_text() and config.read_text().startswith("# depthd settings")
    assert "systemctl daemon-reload && systemctl enable --now depthd" in capsys.readouterr().out

    config.write_text(config.read_text().replace("max_wait_ms: 2 ", "max_wait_ms: 5 "))
    assert depthd_main(["install-service", "--prefix", str(root)]) == 0
    assert "max_wait_ms: 5 " in config.read_text()
    assert depthd_main(["uninstall-service", "--prefix", str(root)]) == 0
    assert not unit.exists() and config.exists()
    assert "kept" in capsys.readouterr().out

    config.unlink()
    assert depthd_main(["install-service", "--prefix", str(root)]) == 0
    assert depthd_main(["uninstall-service", "--prefix", str(root)]) == 0
    assert not unit.exists() and not config.exists()
