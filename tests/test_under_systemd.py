"""The depthd unit under a real systemd: PID 1 of a systemd-nspawn container booted from this machine.

systemd-nspawn boots this machine's own root filesystem, bound to a scratch folder in a private
mount namespace, with `--volatile=overlay`: whatever the container writes goes to a tmpfs over the
host's files, so nothing here changes the host. Inside it, as root:

1. depthd is installed in /opt/depthd (a venv of the distribution's Python that uses this checkout's
   packages), and `depthd install-service` writes the unit, the config and the `depthd` group;
2. `systemctl start depthd` returns once the daemon sent READY=1, and the unit is active;
3. the socket is 0660, group `depthd`: root and a member of the group get SERVING, another user is refused;
4. a WARNING (the demo model's) reaches `journalctl -u depthd -p warning`;
5. after `kill -9` of the main process, systemd starts it again (Restart=on-failure);
6. `systemctl stop` with a stream of frames in flight ends with Result=success and exit status 0.

Each step is a test, in this order, on one container and one service. Opt-in; it needs root,
systemd-nspawn (Debian: `apt-get install systemd-container`) and overlayfs, and takes about 25 s:

    .venv/bin/python -m pytest --run-systemd tests/test_under_systemd.py

Where the container cannot boot, the module is skipped with nspawn's own words.
"""

from __future__ import annotations

import os
import select
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

pytestmark = pytest.mark.systemd

VENV = "/opt/depthd/.venv"
PYTHON = f"{VENV}/bin/python"
DEPTHCTL = f"{VENV}/bin/depthctl"
SOCKET = "/run/depthd/depthd.sock"
TARGET = f"unix://{SOCKET}"
MODEL = "/srv/depthd-test/tiny"
MEMBER, OUTSIDER = "depthd-member", "depthd-outsider"
CONFIG = f"""\
listen:
  - "unix:{SOCKET}"
  - "127.0.0.1:50051"
device: cpu
models:
  - name: tiny
    source: {MODEL}
    warmup_sizes: [[64, 64]]
demo: true   # also serves "demo", and logs a WARNING that it has random weights
"""
OFFLINE_DROP_IN = "[Service]\nEnvironment=HF_HUB_OFFLINE=1\n"
DEMO_WARNING = "DEMO model=demo"

# Streams one frame over and over until the daemon ends the stream; says when the first answer came.
LOAD_CLIENT = f"""
import itertools
import numpy as np
from depthd_client import DepthClient

frame = np.full((64, 64, 3), 128, np.uint8)
answered = 0
try:
    with DepthClient({TARGET!r}) as client:
        for result in client.stream(itertools.repeat(frame)):
            answered += 1
            if answered == 1:
                print("streaming", flush=True)
    print(answered, "frames answered, then the stream ended", flush=True)
except Exception as error:
    print(answered, f"frames answered, then {{type(error).__name__}}: {{error}}", flush=True)
"""

CHECKOUT = Path(__file__).resolve().parents[1]
SOURCE = "/opt/depthd-src"
"""Where the container sees this checkout (bound read-only)."""
NSPAWN = [
    "systemd-nspawn",
    "--volatile=overlay",  # the container writes to a tmpfs over the host's files, never to them
    "--boot",  # /sbin/init: systemd as PID 1
    "--register=no",  # no systemd-machined on a host without systemd
    "--keep-unit",  # nor a host systemd to ask for a scope ("Failed to open system bus: No such file or directory")
    "--link-journal=no",  # the container has the host's machine id: nothing to link
    "--private-network",  # its own loopback: 127.0.0.1:50051 cannot clash with the host's
    "--console=pipe",  # no terminal here
]
ENVIRONMENT = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HF_HUB_OFFLINE": "1"}

_leader: int | None = None
"""PID (on the host) of the container's systemd: commands enter its namespaces."""

T = TypeVar("T")


def inside(*command: str, user: str | None = None, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `command` in the container, as root or as `user` (with that user's groups); output as text."""
    assert _leader is not None, "the container is not running"
    if user is not None:
        command = ("setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *command)
    result = subprocess.run(
        ["nsenter", f"--target={_leader}", "--all", *command],
        capture_output=True, text=True, timeout=timeout, env=ENVIRONMENT,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"`{shlex.join(command)}` exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def write_inside(path: str, text: str, mode: int = 0o644) -> None:
    """A file of the container's (in its overlay), written through /proc/<its PID 1>/root."""
    target = Path(f"/proc/{_leader}/root") / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(mode)


def show(*properties: str) -> dict[str, str]:
    """`systemctl show` of the depthd unit: {"ActiveState": "active", ...}."""
    lines = inside("systemctl", "show", "depthd", *(f"--property={name}" for name in properties)).stdout
    return dict(line.split("=", 1) for line in lines.splitlines() if "=" in line)


def journal(*options: str) -> str:
    return inside("journalctl", "--unit=depthd", "--no-pager", "--output=cat", *options).stdout


def log_tail(lines: int = 40) -> str:
    """The journal's last lines about depthd, systemd's own included (`--unit` misses those of the
    forked child before it runs the daemon, e.g. "Failed to update dynamic user credentials")."""
    about = [line for line in inside("journalctl", "--no-pager", "--output=short").stdout.splitlines() if "depthd" in line]
    return "\n".join(about[-lines:])


def wait_for(condition: Callable[[], T], what: str, timeout: float = 60) -> T:
    """Poll `condition` until it returns something true, for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}\n{show('ActiveState', 'SubState', 'Result', 'MainPID')}\n"
                                 f"{log_tail()}")
        time.sleep(0.2)
    return value


def require_active() -> dict[str, str]:
    state = show("ActiveState", "SubState", "MainPID", "NRestarts")
    assert state["ActiveState"] == "active", f"depthd is not running (see the tests before): {state}"
    return state


# --- the container -----------------------------------------------------------------------------------


def payload_pid(nspawn: int) -> int | None:
    """The container's PID 1 (on the host): nspawn's child, once it is systemd."""
    try:
        children = Path(f"/proc/{nspawn}/task/{nspawn}/children").read_text().split()
        return next((int(pid) for pid in children if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd"), None)
    except OSError:
        return None


def boot(root: Path, log: Path, timeout: float = 90) -> tuple[subprocess.Popen, str]:
    """Boot the host's / (bound at `root` in a private mount namespace) and wait until its systemd is up."""
    global _leader
    command = [*NSPAWN, f"--bind-ro={CHECKOUT}:{SOURCE}", f"--directory={root}"]
    shell = f"mount --bind / {shlex.quote(str(root))} && exec {shlex.join(command)}"
    with log.open("wb") as out:
        nspawn = subprocess.Popen(
            ["unshare", "--mount", "--propagation=private", "sh", "-c", shell],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and nspawn.poll() is None:
            _leader = _leader or payload_pid(nspawn.pid)
            if _leader:  # before its systemd listens, systemctl fails at once; then it waits for the boot's end
                left = max(1.0, deadline - time.monotonic())
                state = inside("systemctl", "is-system-running", "--wait", check=False, timeout=left)
                if state.stdout.strip() in ("running", "degraded"):
                    return nspawn, state.stdout.strip()
            time.sleep(0.2)
    except BaseException:
        halt(nspawn)
        raise
    halt(nspawn)
    pytest.skip(f"the container did not boot in {timeout} s: `{shlex.join(NSPAWN)}` said:\n{log.read_text(errors='replace')}")


def halt(nspawn: subprocess.Popen) -> None:
    """SIGTERM makes nspawn halt the container; a second signal ends it at once."""
    global _leader
    nspawn.terminate()
    try:
        nspawn.wait(timeout=30)
    except subprocess.TimeoutExpired:
        nspawn.kill()
        nspawn.wait()
    _leader = None


def install_depthd_in_opt() -> None:
    """depthd in /opt/depthd, as the README installs it, from this checkout's packages.

    install-service refuses a Python the service cannot reach, and a checkout's venv often runs a
    Python from /root (pyenv's, here: /root is 0700). So: a venv of the distribution's Python of the
    same version, whose site-packages take in this checkout's (a .pth line), and the console scripts.
    """
    inside(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}", "-m", "venv", "--without-pip", VENV)
    ours = inside(PYTHON, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    # The checkout is bound at SOURCE (a clone under /tmp would be hidden by the container's own /tmp):
    # its sources first, then its venv's packages.
    packages = Path(sysconfig.get_paths()["purelib"])
    if packages.is_relative_to(CHECKOUT):
        packages = Path(SOURCE) / packages.relative_to(CHECKOUT)
    sources = [SOURCE, f"{SOURCE}/clients/python"]
    write_inside(f"{ours}/depthd-checkout.pth",
                 f"import sys, site; sys.path[:0] = {sources!r}; site.addsitedir({str(packages)!r})\n")
    for script, module in (("depthd", "depthd.ops.cli"), ("depthctl", "depthd_client.cli")):
        write_inside(f"{VENV}/bin/{script}", f"#!{PYTHON}\nimport sys\nfrom {module} import main\nsys.exit(main())\n", 0o755)


@pytest.fixture(scope="module", autouse=True)
def container(tmp_path_factory) -> Iterator[None]:
    """A booted container with depthd in /opt/depthd and a tiny model in /srv; halted at the end, whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("systemd-nspawn needs root")
    for tool in ("systemd-nspawn", "unshare", "nsenter", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"no {tool} (systemd-nspawn: `apt-get install systemd-container`)")
    if not Path("/lib/systemd/systemd").exists():
        pytest.skip("no systemd to boot: /lib/systemd/systemd is missing (`apt-get install systemd`)")
    python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if not Path(python).exists():
        pytest.skip(f"no {python} to install depthd in /opt/depthd with")
    scratch = tmp_path_factory.mktemp("nspawn")
    root = scratch / "root"
    root.mkdir()
    started = time.monotonic()
    nspawn, state = boot(root, scratch / "nspawn.log")
    try:
        print(f"\ncontainer: systemd {state} after {time.monotonic() - started:.1f} s, PID 1 is {_leader} on the host")
        install_depthd_in_opt()
        inside(PYTHON, "-c", f"from depthd.engine import synthetic; synthetic.build('depth_anything', {MODEL!r})")
        inside("chmod", "-R", "a+rX", str(Path(MODEL).parent))  # the service's dynamic user reads it
        yield
    finally:
        halt(nspawn)
        print(f"\ncontainer: halted; {time.monotonic() - started:.1f} s in all")


# --- the steps, in order -----------------------------------------------------------------------------


def test_install_service_writes_the_unit_the_config_and_the_group():
    installed = inside(f"{VENV}/bin/depthd", "install-service")
    print(installed.stdout)
    unit = inside("cat", "/etc/systemd/system/depthd.service").stdout
    assert f"ExecStart={VENV}/bin/depthd serve --config /etc/depthd/depthd.yaml" in unit
    assert inside("getent", "group", "depthd", check=False).returncode == 0, (
        f"install-service did not create the socket's group `depthd`:\n{installed.stdout}"
    )
    write_inside("/etc/depthd/depthd.yaml", CONFIG)
    write_inside("/etc/systemd/system/depthd.service.d/offline.conf", OFFLINE_DROP_IN)
    inside("systemctl", "daemon-reload")
    # as install-service says; it also keeps the unit loaded while stopped, so that `systemctl show`
    # reports how it last ended rather than a fresh unit's defaults (Result=success, ExecMainStatus=0)
    inside("systemctl", "enable", "depthd")


def test_start_returns_when_the_daemon_is_ready():
    started = time.monotonic()
    start = inside("systemctl", "start", "depthd", check=False, timeout=300)
    state = show("ActiveState", "SubState", "Result", "ExecMainStatus", "StatusText", "MainPID")
    print(f"start took {time.monotonic() - started:.1f} s: {state}")
    assert start.returncode == 0, f"{start.stderr}{state}\n{log_tail()}"
    assert (state["ActiveState"], state["SubState"], state["Result"]) == ("active", "running", "success")
    assert state["StatusText"].startswith("serving"), state  # the daemon's last STATUS=


def test_the_socket_serves_root_and_the_depthd_group_only():
    pid = require_active()["MainPID"]
    credentials = inside("ps", "-o", "user=,group=,supgrp=", "-p", pid).stdout.strip()
    status = inside("grep", "-E", "^(Uid|Gid|Groups):", f"/proc/{pid}/status").stdout
    print(f"the service runs as (user, group, supplementary groups): {credentials}\n{status}")
    assert inside("stat", "--format=%a %G", SOCKET).stdout.split() == ["660", "depthd"]

    inside("useradd", "--user-group", "--no-create-home", "--groups=depthd", MEMBER)
    inside("useradd", "--user-group", "--no-create-home", OUTSIDER)
    assert inside(DEPTHCTL, f"--target={TARGET}", "health").stdout.strip() == "SERVING"
    assert inside(DEPTHCTL, f"--target={TARGET}", "health", user=MEMBER).stdout.strip() == "SERVING"
    refused = inside(DEPTHCTL, f"--target={TARGET}", "health", user=OUTSIDER, check=False)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused


def test_a_warning_reaches_the_journal_as_a_warning():
    require_active()
    warnings = journal("--priority=warning")
    assert DEMO_WARNING in warnings, f"no {DEMO_WARNING!r} at priority warning or above:\n{warnings}\nall of it:\n{journal()}"


def test_systemd_restarts_it_after_kill_9():
    before = require_active()
    inside("kill", "-9", before["MainPID"])
    started = time.monotonic()

    def restarted() -> dict[str, str] | None:
        state = show("ActiveState", "MainPID", "NRestarts")
        return state if state["ActiveState"] == "active" and state["MainPID"] not in ("0", before["MainPID"]) else None

    after = wait_for(restarted, "depthd active again with a new main PID", timeout=120)
    print(f"active again {time.monotonic() - started:.1f} s after kill -9: {before} -> {after}")
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    assert "status=9/KILL" in journal()


def test_stop_under_load_is_a_clean_exit():
    require_active()
    load = subprocess.Popen(
        ["nsenter", f"--target={_leader}", "--all", PYTHON, "-c", LOAD_CLIENT],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENVIRONMENT,
    )
    try:
        ready, _, _ = select.select([load.stdout], [], [], 60)
        first = load.stdout.readline().strip() if ready else ""
        assert first == "streaming", f"the load client did not get an answer: {first!r}"
        started = time.monotonic()
        inside("systemctl", "stop", "depthd", timeout=60)
        stopped = time.monotonic() - started
        outcome = load.communicate(timeout=60)[0].strip()
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    state = show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    print(f"stop took {stopped:.1f} s; the client: {outcome}; {state}")
    assert state["ActiveState"] == "inactive", state
    assert (state["Result"], state["ExecMainCode"], state["ExecMainStatus"]) == ("success", "1", "0"), (  # 1: CLD_EXITED
        f"{state}\n{log_tail()}"
    )
