"""Probe a depthd daemon from outside for the limits of issue 10 (findings 1-4 and 6).

One job: start `depthd serve` from a source tree as a subprocess, push it with legal but
costly requests over gRPC (the raw generated stubs, not DepthClient, so the same script
runs against old and new code), and record what the daemon did: wall time, status codes,
reply sizes, its RSS from /proc, how far a stream runs ahead, how SIGTERM ends.

    .venv/bin/python benchmarks/limits.py --json benchmarks/results/limits-after.json
    .venv/bin/python benchmarks/limits.py --tree /work/before --json benchmarks/results/limits-before.json
    .venv/bin/python benchmarks/limits.py --only shutdown --shutdown-tries 5 --json ...   # rerun one part

Measurements (--only, comma-separated; default all):
  compute       Depth Anything V2 Small: a 640x480 PNG, a 1036x518 PNG (the largest processed size
                under the default cap), then a 518x6000 PNG with a 64x48 frame on another call
                meanwhile: wall time, peak RSS (VmHWM), the small frame's latency.
  output        tiny model: the derived output size (16x512 at width=1024 under max_output_side=1024;
                16x32 at width=8192), and a 16x16 JPEG whose header claims 6000x6000.
  memory        tiny model: RSS around 80 concurrent 4000x4000 PNG calls; RSS after 15 s of two
                streams asking for 8192x8192 float32 maps and never reading them.
  backpressure  Depth Anything V2 Small, stream_window 4: how many 640x480 JPEGs one stream gets
                to send, and how stale its answers are; then 200 small frames on the tiny model.
  shutdown      Depth Anything V2 Small, drain_grace_s 1: SIGTERM during a long forward pass;
                exit code, seconds to exit, the in-flight call's status (--shutdown-tries times).

Every case survives the daemon failing (error status, timeout, death): what happened is
recorded. The JSON file is merged: measurements not run this time keep their old entries.
Models are built once with random weights into --workdir (nothing is downloaded). Timings
only; nothing asserts. Other load on the machine changes the figures: the load average is
recorded with each measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

log = logging.getLogger("limits")

MEASUREMENTS = ("compute", "output", "memory", "backpressure", "shutdown")
DAV2S, TINY = "dav2s", "tiny"
MiB = 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


# --- images ------------------------------------------------------------------------------------


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def gradient_png(width: int, height: int) -> bytes:
    """Smooth content: compresses like a real picture of sky and walls, decodes to full size."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), 0.5 + 0.5 * np.sin(x / 37 + y / 53)], -1)
    return _png((image * 255).astype(np.uint8))


def flat_png(width: int, height: int, value: int = 128) -> bytes:
    return _png(np.full((height, width, 3), value, np.uint8))


def camera_jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    image = np.stack([0.4 + 0.3 * x, 0.5 + 0.2 * np.sin(4 * x + seed), 0.6 - 0.4 * np.clip(y - 0.5, 0, 1)], -1)
    image += rng.normal(0, 0.03, image.shape)
    buffer = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def smooth_jpeg(width: int, height: int) -> bytes:
    """The gradient picture as a JPEG without sensor noise: a few times smaller than camera_jpeg."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(gradient_png(width, height))).save(buffer, format="JPEG", quality=75)
    return buffer.getvalue()


def lying_jpeg(claimed_width: int, claimed_height: int) -> bytes:
    """A real 16x16 JPEG whose frame header (SOF0) claims another size; libjpeg pads the rest."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(buffer, format="JPEG", quality=50)
    data = bytearray(buffer.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", claimed_height, claimed_width)
    return bytes(data)


# --- the daemon under test -----------------------------------------------------------------------


def import_stubs(tree: Path) -> SimpleNamespace:
    """The tree's own generated stubs (the proto is fixed, so either tree's would do)."""
    sys.path.insert(0, str(tree / "clients" / "python"))
    from depthd_client.v1 import depth_pb2, depth_pb2_grpc

    return SimpleNamespace(pb=depth_pb2, grpc=depth_pb2_grpc)


def daemon_env(tree: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPTHD_")}
    env.update(PYTHONPATH=f"{tree}:{tree / 'clients' / 'python'}", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env.update(extra or {})
    return env


def module_of(tree: Path, new: str, old: str) -> str:
    """The module's name in this tree's layout (the package was reorganised after the first runs)."""
    return new if (tree / (new.replace(".", "/") + ".py")).exists() or (tree / new / "__main__.py").exists() else old


def ensure_models(tree: Path, python: str, folder: Path) -> dict[str, Path]:
    """Depth Anything V2 Small and the tiny Depth Anything, random weights, built once."""
    synthetic = module_of(tree, "depthd.engine.synthetic", "depthd.synthetic")
    builds = {
        DAV2S: [python, "-m", synthetic, "depth-anything-v2-small", str(folder / DAV2S)],
        TINY: [python, "-c", f"import {synthetic} as s; s.build('depth_anything', {str(folder / TINY)!r})"],
    }
    for name, command in builds.items():
        if not (folder / name / "config.json").exists():
            log.info("building %s into %s", name, folder / name)
            subprocess.run(command, env=daemon_env(tree), check=True, capture_output=True)
    return {name: folder / name for name in builds}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"exit {code} ({signal.Signals(-code).name})"
    return f"exit {code}"


class DaemonDied(RuntimeError):
    pass


@dataclass
class Daemon:
    """`depthd serve` on a free loopback port with one model and the given limits."""

    tree: Path
    python: str
    api: SimpleNamespace
    model: Path
    logdir: Path
    limits: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    warmup: tuple[int, int] = (480, 640)
    rss_cap: int = 12 * 1024 * MiB
    start_timeout_s: float = 300.0

    def __post_init__(self):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.guard_tripped = ""
        self._stopped = threading.Event()

    # life

    def start(self) -> "Daemon":
        self.logdir.mkdir(parents=True, exist_ok=True)
        config = self.logdir / f"depthd-{self.port}.yaml"
        config.write_text(json.dumps({  # JSON is YAML
            "listen": [self.address],
            "models": [{"name": self.model.name, "source": str(self.model), "warmup_sizes": [list(self.warmup)]}],
            "limits": self.limits,
            "log_level": "info",
        }, indent=2))
        self.log_path = self.logdir / f"depthd-{self.port}.log"
        self._log = open(self.log_path, "wb")
        command = [self.python, "-m", module_of(self.tree, "depthd", "depthd.cli"), "serve", "--config", str(config)]
        self.proc = subprocess.Popen(command, env=daemon_env(self.tree, self.env), cwd=self.tree,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        started = time.perf_counter()
        self.wait_serving()
        self.startup_s = time.perf_counter() - started
        threading.Thread(target=self._guard, daemon=True).start()
        log.info("daemon pid %d serving %s on %s after %.1f s", self.proc.pid, self.model.name, self.address, self.startup_s)
        return self

    def wait_serving(self) -> None:
        """Watch grpc.health.v1 until it says SERVING; fail if the process dies first."""
        deadline = time.monotonic() + self.start_timeout_s
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise DaemonDied(f"daemon died before serving, {describe_exit(self.proc.returncode)}: {self.log_tail()}")
                try:
                    for reply in health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5, wait_for_ready=True):
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                except grpc.RpcError as error:
                    if error.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                        raise
        raise TimeoutError(f"not SERVING after {self.start_timeout_s:.0f} s")

    def terminate(self, timeout_s: float) -> tuple[int | None, float]:
        """SIGTERM; wait up to timeout_s (then SIGKILL). Returns (exit code or None if killed late, seconds)."""
        started = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        return code, time.perf_counter() - started

    def close(self) -> None:
        self._stopped.set()
        if self.proc is not None and self.proc.poll() is None:
            self.terminate(30)
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # looking at it

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def state(self) -> str:
        if self.guard_tripped:
            return self.guard_tripped
        return "alive" if self.alive() else f"daemon died, {describe_exit(self.proc.returncode)}"

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM (the peak since start or the last reset_peak) in bytes; {} once it is gone."""
        try:
            lines = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        except OSError:
            return {}
        values = dict(line.split(":", 1) for line in lines if ":" in line)
        return {key: int(values[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM") if key in values}

    def cpu_seconds(self) -> float:
        """User + system CPU time the daemon has used so far (its threads included)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (our own child: /proc/PID/clear_refs accepts "5")."""
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def log_tail(self, lines: int = 8) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        return ""

    def log_has(self, text: str) -> bool:
        with contextlib.suppress(OSError):
            return text in self.log_path.read_text(errors="replace")
        return False

    def _guard(self) -> None:
        """Kill the daemon if its RSS passes the cap, so that a probe cannot take the machine down."""
        while not self._stopped.wait(0.25) and self.alive():
            rss = self.memory().get("VmRSS", 0)
            if rss > self.rss_cap:
                self.guard_tripped = f"killed by the benchmark: RSS {rss / MiB:.0f} MiB over the cap {self.rss_cap / MiB:.0f} MiB"
                log.warning(self.guard_tripped)
                self.proc.kill()
                return

    # talking to it

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)

    def request(self, image: bytes, frame_id: int = 0, **output: int) -> Any:
        pb = self.api.pb
        return pb.EstimateRequest(image=pb.Image(encoded=image), frame_id=frame_id, timestamp_ns=time.time_ns(),
                                  output=pb.OutputOptions(**output))


def estimate(daemon: Daemon, channel: grpc.Channel, image: bytes, timeout_s: float, **output: int) -> dict[str, Any]:
    """One unary call: its wall time and either the map's size and reply bytes or the status."""
    request = daemon.request(image, **output)
    stub = daemon.api.grpc.DepthEstimatorStub(channel)
    started = time.perf_counter()
    try:
        reply = stub.Estimate(request, timeout=timeout_s)
    except grpc.RpcError as error:
        return {"ok": False, "seconds": round(time.perf_counter() - started, 3), "request_bytes": request.ByteSize(),
                "code": error.code().name, "message": (error.details() or "")[:300]}
    return {"ok": True, "seconds": round(time.perf_counter() - started, 3), "request_bytes": request.ByteSize(),
            "width": reply.depth.width, "height": reply.depth.height, "reply_bytes": reply.ByteSize(),
            "inference_ms": round(reply.timing.inference_ms, 1), "total_ms": round(reply.timing.total_ms, 1)}


def outcome_text(result: dict[str, Any]) -> str:
    if result.get("ok"):
        return f"{result['width']}x{result['height']} map, {result['reply_bytes']:,} B reply, {result['seconds']:.2f} s"
    return f"{result.get('code')} after {result.get('seconds', 0):.2f} s: {result.get('message', '')[:120]}"


def mib(value: int | None) -> str:
    return "?" if value is None else f"{value / MiB:,.0f} MiB"


# --- recording --------------------------------------------------------------------------------


@dataclass
class Recorder:
    """Rows for the table and data for the JSON; a case that raises is recorded, not fatal."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, measurement: str, case: str, text: str, **data: Any) -> None:
        self.results.setdefault(measurement, {}).setdefault("cases", {})[case] = {"result": text, **data}
        self.rows.append((measurement, case, text))
        log.info("%s / %s: %s", measurement, case, text)

    def meta(self, measurement: str, **data: Any) -> None:
        self.results.setdefault(measurement, {}).update(data)

    @contextlib.contextmanager
    def case(self, measurement: str, name: str, daemon: Daemon | None = None) -> Iterator[None]:
        try:
            yield
        except Exception as error:  # noqa: BLE001 - a probe must survive whatever the daemon does
            state = f"; {daemon.state()}; log: {daemon.log_tail(4)}" if daemon is not None else ""
            self.add(measurement, name, f"probe failed: {type(error).__name__}: {str(error)[:200]}{state}")
            log.debug("case failed", exc_info=True)

    def table(self) -> str:
        lines = ["| measurement | case | result |", "|---|---|---|"]
        lines += [f"| {m} | {c} | {t.replace('|', '/')} |" for m, c, t in self.rows]
        return "\n".join(lines)


@dataclass
class Context:
    args: argparse.Namespace
    api: SimpleNamespace
    models: dict[str, Path]
    rec: Recorder

    def daemon(self, model: str, limits: dict[str, int] | None = None, env: dict[str, str] | None = None,
               warmup: tuple[int, int] = (480, 640)) -> Daemon:
        return Daemon(self.args.tree, self.args.python, self.api, self.models[model], self.args.workdir / "logs",
                      limits or {}, env or {}, warmup, int(self.args.rss_cap_gib * 1024 * MiB))


@contextlib.contextmanager
def started(ctx: Context, measurement: str, case: str, daemon: Daemon) -> Iterator[Daemon | None]:
    """Start the daemon for a group of cases; a failed start is recorded and yields None."""
    try:
        daemon.start()
    except Exception as error:  # noqa: BLE001
        ctx.rec.add(measurement, case, f"daemon did not start: {str(error)[:300]}")
        daemon.close()
        yield None
        return
    try:
        yield daemon
    finally:
        daemon.close()


def in_thread(function: Callable[[], Any]) -> tuple[threading.Thread, list]:
    box: list = []
    thread = threading.Thread(target=lambda: box.append(function()), daemon=True)
    thread.start()
    return thread, box


# --- 1. compute per frame ---------------------------------------------------------------------


def measure_compute(ctx: Context) -> None:
    m, deadline = "compute", ctx.args.deadline_s
    with started(ctx, m, "start", ctx.daemon(DAV2S)) as d:
        if d is None:
            return
        with d.channel() as channel:
            with ctx.rec.case(m, "640x480 PNG", d):
                frame = gradient_png(640, 480)
                d.reset_peak()
                cpu = d.cpu_seconds()
                runs = [estimate(d, channel, frame, deadline) for _ in range(3)]
                cpu = d.cpu_seconds() - cpu
                times = [r["seconds"] for r in runs if r["ok"]]
                peak = d.memory().get("VmHWM")
                text = (f"median {statistics.median(times):.2f} s of {len(times)} ({', '.join(f'{t:.2f}' for t in times)}), "
                        f"peak RSS {mib(peak)}, daemon CPU {cpu / len(runs):.1f} s a frame"
                        if times else outcome_text(runs[-1]))
                ctx.rec.add(m, "640x480 PNG", text, runs=runs, peak_rss=peak, daemon_cpu_s=round(cpu, 1))
            with ctx.rec.case(m, "1036x518 PNG", d):
                # processed at 518x1036: the most tokens any frame gets under the default size cap
                wide = gradient_png(1036, 518)
                runs = [estimate(d, channel, wide, deadline) for _ in range(3)]
                times = [r["seconds"] for r in runs if r["ok"]]
                text = f"median {statistics.median(times):.2f} s of {len(times)}" if times else outcome_text(runs[-1])
                ctx.rec.add(m, "1036x518 PNG", text, runs=runs)
            with ctx.rec.case(m, "64x48 PNG alone", d):
                alone = estimate(d, channel, gradient_png(64, 48), deadline)
                ctx.rec.add(m, "64x48 PNG alone", outcome_text(alone), **alone)
            with ctx.rec.case(m, "518x6000 PNG", d):
                tall = gradient_png(518, 6000)
                before, cpu = d.memory(), d.cpu_seconds()
                d.reset_peak()
                thread, box = in_thread(lambda: estimate(d, channel, tall, deadline))
                time.sleep(ctx.args.overlap_delay_s)  # let the tall frame reach its forward pass
                small = estimate(d, channel, gradient_png(64, 48), deadline)
                thread.join()
                big, peak, cpu = box[0], d.memory().get("VmHWM"), d.cpu_seconds() - cpu
                ctx.rec.add(m, "518x6000 PNG", f"{outcome_text(big)}; request {len(tall):,} B; peak RSS {mib(peak)} "
                            f"(RSS before {mib(before.get('VmRSS'))}); daemon CPU {cpu:.0f} s (both calls); {d.state()}",
                            **big, png_bytes=len(tall), peak_rss=peak, rss_before=before.get("VmRSS"), daemon_cpu_s=round(cpu, 1))
                ctx.rec.add(m, "64x48 during 518x6000",
                            f"{outcome_text(small)} (sent {ctx.args.overlap_delay_s:.1f} s after the tall frame)",
                            **small, sent_after_s=ctx.args.overlap_delay_s)


# --- 2. output size ---------------------------------------------------------------------------


def measure_output(ctx: Context) -> None:
    m, deadline = "output", ctx.args.deadline_s
    with started(ctx, m, "(a) start", ctx.daemon(TINY, {"max_output_side": 1024})) as d:
        if d is not None:
            with ctx.rec.case(m, "(a) 16x512, width=1024, max_output_side=1024", d), d.channel() as channel:
                result = estimate(d, channel, gradient_png(16, 512), deadline, width=1024)
                ctx.rec.add(m, "(a) 16x512, width=1024, max_output_side=1024", f"{outcome_text(result)}; {d.state()}", **result)
    with started(ctx, m, "(b) start", ctx.daemon(TINY)) as d:
        if d is None:
            return
        with d.channel() as channel:
            with ctx.rec.case(m, "(b) 16x32 PNG, width=8192", d):
                png = gradient_png(16, 32)
                d.reset_peak()
                result = estimate(d, channel, png, deadline, width=8192)
                peak = d.memory().get("VmHWM")
                ctx.rec.add(m, "(b) 16x32 PNG, width=8192",
                            f"{outcome_text(result)}; request {result['request_bytes']} B; peak RSS {mib(peak)}; {d.state()}",
                            **result, png_bytes=len(png), peak_rss=peak)
            with ctx.rec.case(m, "(c) 16x16 JPEG claiming 6000x6000", d):
                jpeg = lying_jpeg(6000, 6000)
                d.reset_peak()
                result = estimate(d, channel, jpeg, deadline)
                peak = d.memory().get("VmHWM")
                ctx.rec.add(m, "(c) 16x16 JPEG claiming 6000x6000",
                            f"{outcome_text(result)}; request {result['request_bytes']} B; peak RSS {mib(peak)}; {d.state()}",
                            **result, jpeg_bytes=len(jpeg), peak_rss=peak)


# --- 3. memory --------------------------------------------------------------------------------


def measure_memory(ctx: Context) -> None:
    m, case = "memory", f"(a) {ctx.args.unary_calls} x 4000x4000 PNG unary"
    with started(ctx, m, case, ctx.daemon(TINY)) as d:
        if d is not None:
            with ctx.rec.case(m, case, d), d.channel() as channel:
                png = flat_png(4000, 4000)
                before, cpu = d.memory(), d.cpu_seconds()
                d.reset_peak()
                started_at = time.perf_counter()
                with ThreadPoolExecutor(ctx.args.unary_calls) as pool:
                    results = list(pool.map(lambda _: estimate(d, channel, png, ctx.args.deadline_s),
                                            range(ctx.args.unary_calls)))
                seconds, cpu = time.perf_counter() - started_at, d.cpu_seconds() - cpu
                after = d.memory()
                codes = count_codes(results)
                ctx.rec.add(m, case,
                            f"RSS {mib(before.get('VmRSS'))} before, peak {mib(after.get('VmHWM'))}, {mib(after.get('VmRSS'))} "
                            f"after; {codes}; {seconds:.1f} s, daemon CPU {cpu:.0f} s; PNG {len(png):,} B; {d.state()}",
                            rss_before=before.get("VmRSS"), peak_rss=after.get("VmHWM"), rss_after=after.get("VmRSS"),
                            codes=codes, seconds=round(seconds, 1), daemon_cpu_s=round(cpu, 1), png_bytes=len(png),
                            calls=ctx.args.unary_calls)
    with started(ctx, m, "(b) start", ctx.daemon(TINY)) as d:
        if d is not None:
            with ctx.rec.case(m, "(b) 2 unread streams, 8192x8192 float32", d), d.channel() as channel:
                unread_streams(ctx, d, channel)


def count_codes(results: list[dict[str, Any]]) -> dict[str, int]:
    codes: dict[str, int] = {}
    for r in results:
        key = "OK" if r["ok"] else r["code"]
        codes[key] = codes.get(key, 0) + 1
    return codes


class Feeder:
    """A request iterator that counts how many requests gRPC has pulled from it."""

    def __init__(self, make: Callable[[int], Any], limit: int):
        self.make, self.limit = make, limit
        self.pulled = 0
        self.stop = threading.Event()

    def __iter__(self):
        while self.pulled < self.limit and not self.stop.is_set():
            request = self.make(self.pulled)
            self.pulled += 1
            yield request


def unread_streams(ctx: Context, d: Daemon, channel: grpc.Channel) -> None:
    m, seconds = "memory", ctx.args.unread_seconds
    frame = gradient_png(64, 48)
    stub = d.api.grpc.DepthEstimatorStub(channel)
    before = d.memory()
    d.reset_peak()
    feeders = [Feeder(lambda i: d.request(frame, i, width=8192, height=8192), ctx.args.max_stream_frames) for _ in range(2)]
    calls = [stub.EstimateStream(iter(f), timeout=seconds + 60) for f in feeders]  # responses never iterated
    samples = []
    started_at = time.monotonic()
    for tick in range(1, int(seconds) + 1):
        time.sleep(max(0.0, started_at + tick - time.monotonic()))  # one RSS sample a second
        samples.append((tick, d.memory().get("VmRSS")))
    at_end = d.memory()
    for call, feeder in zip(calls, feeders):
        feeder.stop.set()
        call.cancel()
    ctx.rec.add(m, "(b) 2 unread streams, 8192x8192 float32",
                f"RSS {mib(before.get('VmRSS'))} before, {mib(at_end.get('VmRSS'))} after {seconds:.0f} s "
                f"(peak {mib(at_end.get('VmHWM'))}); frames pulled {[f.pulled for f in feeders]} "
                f"(cap {ctx.args.max_stream_frames}); {d.state()}",
                rss_before=before.get("VmRSS"), rss_at_end=at_end.get("VmRSS"), peak_rss=at_end.get("VmHWM"),
                rss_per_second=samples, pulled=[f.pulled for f in feeders])


# --- 4. backpressure --------------------------------------------------------------------------


@dataclass
class StreamLog:
    """What the reading side saw: when each answer came, how old its frame was, and the feeder's count then."""

    answers: list[dict[str, Any]] = field(default_factory=list)
    pulled_at_first: int | None = None
    ended: str = ""
    wall_s: float = 0.0
    daemon_cpu_s: float = 0.0


def read_answers(call: Any, feeder: Feeder, started_at: float, stream_log: StreamLog) -> None:
    try:
        for reply in call:
            now = time.time_ns()
            if stream_log.pulled_at_first is None:
                stream_log.pulled_at_first = feeder.pulled
            stream_log.answers.append({"t_s": round(time.monotonic() - started_at, 3), "frame_id": reply.frame_id,
                                       "age_s": round((now - reply.timestamp_ns) / 1e9, 3),
                                       "total_ms": round(reply.timing.total_ms, 1),
                                       "error": reply.error.code if reply.HasField("error") else 0})
        stream_log.ended = "OK"
    except grpc.RpcError as error:
        stream_log.ended = f"{error.code().name}: {(error.details() or '')[:100]}"


def run_stream(d: Daemon, channel: grpc.Channel, frames: list[bytes], limit: int, seconds: float,
               mark_s: float | None = None, **output: int) -> tuple[Feeder, StreamLog, int | None]:
    """One stream fed as fast as gRPC pulls; read for `seconds` (or until it ends), then cancel."""
    feeder = Feeder(lambda i: d.request(frames[i % len(frames)], i, **output), limit)
    stub = d.api.grpc.DepthEstimatorStub(channel)
    cpu = d.cpu_seconds()
    call = stub.EstimateStream(iter(feeder), timeout=seconds + 60)
    stream_log, started_at = StreamLog(), time.monotonic()
    reader = threading.Thread(target=read_answers, args=(call, feeder, started_at, stream_log), daemon=True)
    reader.start()
    pulled_at_mark = None
    if mark_s is not None:
        reader.join(mark_s)
        pulled_at_mark = feeder.pulled
    reader.join(max(0.0, started_at + seconds - time.monotonic()))
    stream_log.wall_s, stream_log.daemon_cpu_s = round(time.monotonic() - started_at, 1), round(d.cpu_seconds() - cpu, 1)
    feeder.stop.set()
    call.cancel()
    reader.join(10)
    return feeder, stream_log, pulled_at_mark


def first_text(stream_log: StreamLog, feeder: Feeder) -> str:
    if stream_log.pulled_at_first is None:
        return f"all {feeder.pulled} pulled before any answer"
    return f"{stream_log.pulled_at_first} pulled before the first answer"


def ages_text(answers: list[dict[str, Any]]) -> str:
    ages = [a["age_s"] for a in answers]
    if not ages:
        return "no answers"
    return f"{len(ages)} answers, age first {ages[0]:.1f} s, last {ages[-1]:.1f} s, max {max(ages):.1f} s"


def measure_backpressure(ctx: Context) -> None:
    m, args = "backpressure", ctx.args
    kinds = {"noisy": [camera_jpeg(640, 480, seed) for seed in range(8)], "smooth": [smooth_jpeg(640, 480)]}
    for kind, frames in kinds.items():
        size = statistics.mean(len(f) for f in frames)
        case = f"DAV2S 640x480 {kind} JPEG ({size / 1000:.0f} kB), {args.backpressure_seconds:.0f} s"
        with started(ctx, m, case, ctx.daemon(DAV2S, {"stream_window": 4})) as d:
            if d is None:
                continue
            with ctx.rec.case(m, case, d), d.channel() as channel:
                feeder, seen, at_5s = run_stream(d, channel, frames, args.max_stream_frames, args.backpressure_seconds,
                                                 mark_s=5.0, encoding=d.api.pb.DEPTH_ENCODING_FLOAT16)
                ctx.rec.add(m, case,
                            f"pulled {at_5s} in 5 s ({at_5s * size / MiB:.1f} MiB), {first_text(seen, feeder)}, "
                            f"{feeder.pulled} in all (cap {args.max_stream_frames}); {ages_text(seen.answers)}; "
                            f"stream {seen.ended or 'cancelled'}; daemon CPU {seen.daemon_cpu_s:.0f} s in {seen.wall_s:.0f} s; "
                            f"RSS {mib(d.memory().get('VmRSS'))}; {d.state()}",
                            wall_s=seen.wall_s, daemon_cpu_s=seen.daemon_cpu_s, pulled_at_5s=at_5s,
                            pulled_before_first_answer=seen.pulled_at_first, pulled_total=feeder.pulled,
                            answers=seen.answers, ended=seen.ended, jpeg_bytes=[len(f) for f in frames])
    case = "tiny 200 x 64x48 PNG"
    with started(ctx, m, case, ctx.daemon(TINY, {"stream_window": 4}, warmup=(48, 64))) as d:
        if d is not None:
            with ctx.rec.case(m, case, d), d.channel() as channel:
                feeder, seen, _ = run_stream(d, channel, [gradient_png(64, 48)], 200, args.deadline_s)
                last = seen.answers[-1]["t_s"] if seen.answers else None
                ctx.rec.add(m, case,
                            f"{first_text(seen, feeder)}; {ages_text(seen.answers)}; "
                            f"all answered in {last} s; daemon CPU {seen.daemon_cpu_s:.0f} s; stream {seen.ended}",
                            daemon_cpu_s=seen.daemon_cpu_s, pulled_before_first_answer=seen.pulled_at_first, answers=seen.answers,
                            ended=seen.ended,
                            seconds=last)


# --- 6. shutdown ------------------------------------------------------------------------------


def measure_shutdown(ctx: Context) -> None:
    m, args = "shutdown", ctx.args
    width, height = (int(v) for v in args.shutdown_frame.split("x"))
    frame = gradient_png(width, height)
    ctx.rec.meta(m, frame=args.shutdown_frame, sigterm_after_s=args.sigterm_after_s, drain_grace_s=1)
    for attempt in range(1, args.shutdown_tries + 1):
        case = f"try {attempt}: {args.shutdown_frame}, SIGTERM at +{args.sigterm_after_s:.1f} s"
        with started(ctx, m, case, ctx.daemon(DAV2S, env={"DEPTHD_DRAIN_GRACE_S": "1"})) as d:
            if d is None:
                continue
            with ctx.rec.case(m, case, d), d.channel() as channel:
                thread, box = in_thread(lambda: estimate(d, channel, frame, args.deadline_s))
                time.sleep(args.sigterm_after_s)  # the call is decoded and in its forward pass by then
                code, seconds = d.terminate(args.shutdown_timeout_s)
                thread.join(args.deadline_s)
                call = box[0] if box else {"ok": False, "code": "no answer", "seconds": args.deadline_s}
                aborted = d.log_has("terminate called")
                killed = "" if code is not None else f" (still running after {args.shutdown_timeout_s:.0f} s: SIGKILL)"
                ctx.rec.add(m, case,
                            f"{describe_exit(code)}{killed} {seconds:.1f} s after SIGTERM; call: {outcome_text(call)}"
                            f"{'; log: terminate called' if aborted else ''}",
                            exit_code=code, seconds_to_exit=round(seconds, 2), call=call, terminate_called=aborted,
                            log_tail=d.log_tail(6))


# --- main -------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    meminfo = Path("/proc/meminfo").read_text().splitlines()[0]
    return {"cpu": model, "cores": os.cpu_count(), "simd_flags": sorted(f for f in flags if f.startswith(("avx512", "amx"))),
            "amx": any(f.startswith("amx") for f in flags), "memory": meminfo.split(":", 1)[1].strip(),
            "python": platform.python_version(), "kernel": platform.release()}


def cpu_probe_s() -> float:
    """Seconds for a fixed single-threaded task: larger than usual means other work shares the cores."""
    started = time.perf_counter()
    total = 0
    for i in range(3_000_000):
        total += i * i % 7
    return round(time.perf_counter() - started, 3)


def tree_revision(tree: Path) -> dict[str, Any]:
    def git(*command: str) -> str:
        done = subprocess.run(["git", "-C", str(tree), *command], capture_output=True, text=True)
        return done.stdout.strip()

    changed = len(git("status", "--porcelain").splitlines())
    return {"path": str(tree), "commit": git("rev-parse", "HEAD"), "changed_files": changed}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    here = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", type=Path, default=here, help="the depthd source tree to run (default: this repository)")
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs the daemon (default: this one)")
    p.add_argument("--json", type=Path, help="write (merge) the results here")
    p.add_argument("--only", default=",".join(MEASUREMENTS), help=f"comma-separated subset of {', '.join(MEASUREMENTS)}")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/depthd-bench"), help="models (built once) and daemon logs")
    p.add_argument("--deadline-s", type=float, default=120.0, help="deadline of every unary call")
    p.add_argument("--rss-cap-gib", type=float, default=12.0, help="kill the daemon (and record it) past this RSS")
    p.add_argument("--overlap-delay-s", type=float, default=1.0,
                   help="compute: send the small frame this long after the tall one")
    p.add_argument("--unary-calls", type=int, default=80, help="memory (a): concurrent 4000x4000 calls")
    p.add_argument("--unread-seconds", type=float, default=15.0, help="memory (b): how long the unread streams run")
    p.add_argument("--max-stream-frames", type=int, default=5000, help="most frames one feeding stream offers")
    p.add_argument("--backpressure-seconds", type=float, default=15.0, help="backpressure: how long the DAV2S stream runs")
    p.add_argument("--shutdown-tries", type=int, default=5)
    p.add_argument("--shutdown-frame", default="518x3000", help="shutdown: WIDTHxHEIGHT of the in-flight PNG")
    p.add_argument("--sigterm-after-s", type=float, default=0.5, help="shutdown: SIGTERM this long after the call starts")
    p.add_argument("--shutdown-timeout-s", type=float, default=60.0, help="shutdown: SIGKILL if not gone by then")
    p.add_argument("--tag", default="", help="suffix for the JSON keys of this run's measurements, e.g. @2 for a repeat")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.tree = args.tree.resolve()
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(args.only) - set(MEASUREMENTS)
    if unknown:
        p.error(f"--only: unknown {', '.join(sorted(unknown))}; choose from {', '.join(MEASUREMENTS)}")
    return args


def write_json(path: Path, rec: Recorder, header: dict[str, Any], tag: str = "") -> None:
    report = json.loads(path.read_text()) if path.exists() else {}
    report.update(header)
    report.setdefault("measurements", {}).update({f"{name}{tag}": data for name, data in rec.results.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s",
                        stream=sys.stderr)
    api = import_stubs(args.tree)
    models = ensure_models(args.tree, args.python, args.workdir)
    ctx = Context(args, api, models, Recorder())
    measures = {"compute": measure_compute, "output": measure_output, "memory": measure_memory,
                "backpressure": measure_backpressure, "shutdown": measure_shutdown}
    revision = tree_revision(args.tree)
    for name in args.only:
        log.info("--- %s", name)
        started_at = time.time()
        ctx.rec.meta(name, tree=revision, load_average_before=os.getloadavg(), cpu_probe_s_before=cpu_probe_s())
        measures[name](ctx)
        ctx.rec.meta(name, seconds=round(time.time() - started_at, 1), load_average_after=os.getloadavg(),
                     cpu_probe_s_after=cpu_probe_s())
    print(ctx.rec.table())
    if args.json:
        header = {"machine": machine(), f"command{args.tag}": " ".join([sys.executable, *sys.argv])}
        write_json(args.json, ctx.rec, header, args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
