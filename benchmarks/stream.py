"""Depth on a stream of camera frames: the daemon against the transformers pipeline and the bare forward pass.

    .venv/bin/python benchmarks/stream.py                      # Depth Anything V2 Small, random weights
    .venv/bin/python benchmarks/stream.py --model FOLDER       # any local checkpoint

In one run, on the same 640x480 JPEG frames, taking turns in rounds:
  forward    the model's forward pass alone on a pre-processed tensor (the floor);
  pipeline   transformers.pipeline("depth-estimation"), one frame at a time, decoding included;
  daemon     `depthd serve` as a subprocess with its defaults (backend and dtype `auto`), K
             concurrent streams (K = 1, 2, 4) through the real client, float16 output; each
             stream keeps `--in-flight` frames outstanding; and with one frame outstanding, for
             latency; `--variant` adds daemons with other flags, run with 2 streams. On a CPU,
             by default, one per backend and dtype (`--no-backends` leaves them out).
Each daemon's centred error against the float32 pipeline's maps of the same frames, its start
time and its resident memory after warm-up; the error of half precision against float32 in
the engine, and the default daemon's memory after `--soak` frames. It prints a table, which
backend and dtype `auto` chose, and writes JSON with the CPU's flags. Timings only; nothing asserts.
The default model is built from Depth Anything V2 Small's published config with random
weights: its arithmetic, and so its speed, is the real model's; its depth means nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from depthd.engine import synthetic  # noqa: E402
from depthd_client import DepthClient, StreamFrame  # noqa: E402

WIDTH, HEIGHT = 640, 480


@dataclass
class Row:
    name: str
    frames: int
    fps: float
    p50_ms: float
    p99_ms: float
    notes: str = ""
    ratios: dict[str, float] = field(default_factory=dict)
    centred_error: float | None = None
    """Against the float32 pipeline's maps of the same frames: ||got - ref|| / ||ref - mean(ref)||."""


def camera_frames(count: int, seed: int = 0) -> list[bytes]:
    """Smooth scenes with sensor noise, as 640x480 JPEGs of a realistic size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH] / np.array([HEIGHT, WIDTH])[:, None, None]
    frames = []
    for index in range(count):
        phase = index / max(count, 1)
        image = np.stack([0.4 + 0.3 * x, 0.5 + 0.2 * np.sin(4 * x + 6 * phase), 0.6 - 0.4 * np.clip(y - 0.5, 0, 1)], -1)
        image += rng.normal(0, 0.03, image.shape)
        buffer = io.BytesIO()
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        frames.append(buffer.getvalue())
    return frames


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


def rate_row(name: str, latencies_s: list[float], wall_s: float, notes: str = "") -> Row:
    ms = [v * 1000 for v in latencies_s]
    return Row(name, len(ms), len(ms) / wall_s, percentile(ms, 50), percentile(ms, 99), notes)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- the references, in this process ------------------------------------------------------


Measure = Callable[[int], tuple[list[float], float]]
"""Runs about n frames; returns each frame's latency and the wall time, in seconds."""


@dataclass
class Run:
    name: str
    notes: str
    measure: Measure
    frames_per_round: int
    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0

    def once(self) -> None:
        latencies, wall = self.measure(self.frames_per_round)
        self.latencies += latencies
        self.wall += wall

    def row(self) -> Row:
        return rate_row(self.name, self.latencies, self.wall, self.notes)


def forward_measure(folder: Path, device: str, dtype: torch.dtype) -> tuple[Measure, str]:
    """The model alone at the size the processor makes of a 640x480 frame."""
    from depthd.config import ModelSettings
    from depthd.engine.checkpoints import load_checkpoint

    checkpoint = load_checkpoint(ModelSettings("forward", str(folder)), device, dtype)
    processed = checkpoint.recipe.plan(HEIGHT, WIDTH).processed
    pixels = torch.randn(1, 3, *processed, device=device, dtype=dtype)

    def measure(count: int) -> tuple[list[float], float]:
        times = []
        with torch.inference_mode():
            for _ in range(count):
                synchronize(device)
                started = time.perf_counter()
                checkpoint.model(pixel_values=pixels)
                synchronize(device)
                times.append(time.perf_counter() - started)
        return times, sum(times)

    measure(2)
    return measure, f"{processed[1]}x{processed[0]} {str(dtype)[6:]}"


def pipeline_measure(folder: Path, device: str, jpegs: list[bytes]) -> tuple[Measure, list[np.ndarray]]:
    """The pipeline's timing, and its float32 maps of the first 4 frames (every error's reference)."""
    from transformers import pipeline

    estimator = pipeline("depth-estimation", model=str(folder), device=device)
    reference = [estimator(Image.open(io.BytesIO(j)))["predicted_depth"].float().cpu().numpy().squeeze()
                 for j in jpegs[:4]]

    def measure(count: int) -> tuple[list[float], float]:
        times = []
        started = time.perf_counter()
        for index in range(count):
            begun = time.perf_counter()
            estimator(Image.open(io.BytesIO(jpegs[index % len(jpegs)])))
            synchronize(device)
            times.append(time.perf_counter() - begun)
        return times, time.perf_counter() - started

    return measure, reference


def centred_error(got: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """The largest, over frames, of ||got - ref|| / ||ref - mean(ref)||."""
    return max(float(np.linalg.norm(g - r) / np.linalg.norm(r - r.mean())) for g, r in zip(got, reference))


def half_precision_error(folder: Path, device: str, jpegs: list[bytes]) -> dict[str, float]:
    """Relative L2 error of each half dtype against float32, over the maps' own variation."""
    from depthd.config import ModelSettings
    from depthd.domain import Frame, OutputSpec
    from depthd.engine.engine import DepthEngine

    frames = [Frame(np.asarray(Image.open(io.BytesIO(j)).convert("RGB"))) for j in jpegs[:4]]
    specs = [OutputSpec()] * len(frames)
    reference = DepthEngine.load(ModelSettings("fp32", str(folder), device=device, dtype="float32"))
    expected = [r.depth for r in reference.estimate(frames, specs)]
    del reference
    dtypes = ["bfloat16", "float16"] if device.startswith("cuda") else ["bfloat16"]
    errors = {}
    for dtype in dtypes:
        engine = DepthEngine.load(ModelSettings(dtype, str(folder), device=device, dtype=dtype))
        got = [r.depth for r in engine.estimate(frames, specs)]
        errors[dtype] = max(
            float(np.linalg.norm(g - e) / np.linalg.norm(e - e.mean())) for g, e in zip(got, expected)
        )
        del engine
    return errors


# --- the daemon, as a subprocess -------------------------------------------------------------


class Daemon:
    def __init__(self, folder: Path, socket: Path, extra: list[str], log: Path):
        self.target = f"unix://{socket}"
        command = [sys.executable, "-m", "depthd", "serve", "--model", f"bench={folder}",
                   "--listen", f"unix:{socket}", "--log-level", "warning", *extra]
        self.log = log.open("w")
        started = time.perf_counter()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        with DepthClient(self.target) as client:
            client.wait_until_serving(timeout=900)
        self.start_s = time.perf_counter() - started
        self.rss_after_warmup_mib = self.rss_mib()

    def maps(self, jpegs: list[bytes]) -> list[np.ndarray]:
        with DepthClient(self.target, timeout=600) as client:
            return [client.estimate(j, encoding="float32").depth for j in jpegs]

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stats(self) -> dict:
        with DepthClient(self.target) as client:
            info = client.models()[0]
        return {"batch_sizes": info.batch_sizes, "frames_total": info.frames_total, "dtype": info.dtype,
                "backend": info.backend, "input_size": info.input_size, "device": info.device,
                "queue_peak": info.queue_peak, "start_s": self.start_s,
                "rss_mib_after_warmup": self.rss_after_warmup_mib}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self.log.close()


def run_streams(target: str, jpegs: list[bytes], streams: int, per_stream: int, in_flight: int) -> tuple[list, float]:
    """`streams` concurrent streams, each with at most `in_flight` frames unanswered."""
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[str] = []

    def one(offset: int) -> None:
        sent: dict[int, float] = {}
        slots = threading.Semaphore(in_flight)

        def frames():
            for index in range(per_stream):
                slots.acquire()
                sent[index] = time.perf_counter()
                yield StreamFrame(jpegs[(offset + index) % len(jpegs)], frame_id=index)

        with DepthClient(target, timeout=600) as client:
            for result in client.stream(frames(), encoding="float16"):
                took = time.perf_counter() - sent[result.frame_id]
                slots.release()
                with lock:
                    if result.ok:
                        latencies.append(took)
                    else:
                        errors.append(f"frame {result.frame_id}: {result.error}")

    threads = [threading.Thread(target=one, args=(k * 7,)) for k in range(streams)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} frames failed, first: {errors[0]}")
    return latencies, wall


def daemon_runs(daemon: Daemon, jpegs: list[bytes], label: str, streams: list[int], frames: int,
                in_flight: int) -> list[Run]:
    with DepthClient(daemon.target) as client:
        client.estimate(jpegs[0], encoding="float16")
    runs = []
    for k in streams:
        per_stream = max(frames // k, in_flight)
        measure = lambda n, k=k, per_stream=per_stream: run_streams(daemon.target, jpegs, k, per_stream, in_flight)  # noqa: E731
        runs.append(Run(f"daemon{label} K={k}", f"{in_flight} in flight per stream", measure, per_stream * k))
    if 1 in streams:
        measure = lambda n: run_streams(daemon.target, jpegs, 1, n, 1)  # noqa: E731
        runs.append(Run(f"daemon{label} K=1 latency", "1 in flight: request to response", measure, frames))
    return runs


def soak(daemon: Daemon, jpegs: list[bytes], total: int) -> dict[str, float]:
    """Resident memory of the daemon after 100 frames and after `total`, on two streams."""
    run_streams(daemon.target, jpegs, 2, 50, 2)
    after_100 = daemon.rss_mib()
    run_streams(daemon.target, jpegs, 2, (total - 100) // 2, 2)
    return {"frames": total, "rss_mib_after_100": after_100, "rss_mib_after_total": daemon.rss_mib()}


# --- report ------------------------------------------------------------------------------------


def add_ratios(rows: list[Row]) -> None:
    by_name = {r.name: r for r in rows}
    for row in rows:
        if row.name.startswith("daemon"):
            row.ratios = {"vs_pipeline": row.fps / by_name["pipeline"].fps, "vs_forward": row.fps / by_name["forward"].fps}


def table(rows: list[Row]) -> str:
    lines = ["| run | frames | fps | p50 ms | p99 ms | ×pipeline | ×forward | centred error | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratios = [f"{r.ratios[k]:.2f}" if k in r.ratios else "" for k in ("vs_pipeline", "vs_forward")]
        error = "" if r.centred_error is None else f"{r.centred_error:.1e}"
        lines.append(f"| {r.name} | {r.frames} | {r.fps:.2f} | {r.p50_ms:.0f} | {r.p99_ms:.0f} | "
                     f"{ratios[0]} | {ratios[1]} | {error} | {r.notes} |")
    return "\n".join(lines)


def machine(device: str) -> dict[str, str]:
    from depthd.engine import hardware

    cpu = hardware.describe_cpu()  # bfloat16 on CPU is fast only with its flags; without them torch emulates it
    info = {"cpu": str(cpu["model"]), "cpu_flags": " ".join(cpu["flags"]), "cores": str(os.cpu_count()),
            "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": str(torch.get_num_threads()), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    import transformers

    info["transformers"] = transformers.__version__
    return info


def backend_variants() -> list[tuple[str, str]]:
    """A daemon per backend and dtype this machine can run (bfloat16 only where the CPU has it)."""
    from depthd.engine import backends, hardware

    half = hardware.native_half_precision(torch.device("cpu")) is not None
    variants = [("torch-fp32", "--backend torch --dtype float32")]
    if half:
        variants.append(("torch-bf16", "--backend torch --dtype bfloat16"))
    if backends.installed("openvino"):
        variants.append(("openvino-fp32", "--backend openvino --dtype float32"))
        if half:
            variants.append(("openvino-bf16", "--backend openvino --dtype bfloat16"))
    if backends.installed("onnxruntime"):
        variants.append(("onnxruntime-fp32", "--backend onnxruntime --dtype float32"))
    return variants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a local checkpoint folder (default: Depth Anything V2 Small, random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=4, help="every run gets a turn in each round")
    parser.add_argument("--frames", type=int, default=0, help="frames per run per round (default: 4 on CPU, 100 on CUDA)")
    parser.add_argument("--streams", default="1,2,4", help="concurrent stream counts")
    parser.add_argument("--in-flight", type=int, default=2, help="frames each stream keeps outstanding")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=FLAGS",
                        help='another daemon with extra serve flags, run with 2 streams, e.g. "bf16=--dtype bfloat16"')
    parser.add_argument("--no-backends", action="store_true",
                        help="on a CPU, leave out the daemons per backend and dtype (torch, openvino, onnxruntime)")
    parser.add_argument("--soak", type=int, default=1000, help="frames for the memory check (0: skip)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/stream.json"))
    args = parser.parse_args(argv)

    cuda = args.device.startswith("cuda")
    frames = args.frames or (100 if cuda else 4)
    dtype = torch.float16 if cuda else torch.float32
    streams = [int(k) for k in args.streams.split(",")]
    jpegs = camera_frames(16)
    daemons: list[Daemon] = []
    with tempfile.TemporaryDirectory(prefix="depthd-bench-") as scratch:
        scratch = Path(scratch)
        folder = args.model or synthetic.build("depth-anything-v2-small", scratch / "model")
        try:
            forward, forward_notes = forward_measure(folder, args.device, dtype)
            pipeline, reference = pipeline_measure(folder, args.device, jpegs)
            runs = [Run("forward", forward_notes, forward, frames),
                    Run("pipeline", "float32, decoding included", pipeline, frames)]
            variants = [("", [], streams)] + [
                (f" {label}", flags.split(), [2]) for label, _, flags in (v.partition("=") for v in args.variant)
            ] + ([] if cuda or args.no_backends else [
                (f" {name}", flags.split(), [2]) for name, flags in backend_variants()])
            for index, (label, flags, counts) in enumerate(variants):
                daemon = Daemon(folder, scratch / f"depthd-{index}.sock",
                                ["--device", args.device, "--cache-dir", str(scratch / "compiled"), *flags],
                                scratch / f"daemon-{index}.log")
                daemons.append(daemon)
                runs += daemon_runs(daemon, jpegs, label, counts, frames, args.in_flight)
            # Every run gets a turn in each round, so a machine whose speed drifts
            # (shared hosts, thermal limits) slows them all alike.
            for round_number in range(args.rounds):
                for run in runs:
                    run.once()
                print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr, flush=True)
            stats = {label.strip() or "default": daemon.stats() for (label, _, _), daemon in zip(variants, daemons)}
            errors_by_label = {label.strip() or "default": centred_error(daemon.maps(jpegs[:4]), reference)
                               for (label, _, _), daemon in zip(variants, daemons)}
            memory = soak(daemons[0], jpegs, args.soak) if args.soak else None
        finally:
            for daemon in daemons:
                daemon.stop()
        errors = half_precision_error(folder, args.device, jpegs)
    rows = [run.row() for run in runs]
    add_ratios(rows)
    for row in rows:
        if row.name.startswith("daemon"):
            label = row.name.removeprefix("daemon").split(" K=")[0].strip() or "default"
            row.centred_error = errors_by_label[label]
            info = stats[label]
            row.notes += f"; {info['backend']} {info['dtype']}"
    report = {"machine": machine(args.device), "model": str(args.model or "depth-anything-v2-small (random weights)"),
              "rounds": args.rounds, "rows": [asdict(r) for r in rows], "daemon_stats": stats,
              "half_precision_error": errors, "memory": memory}
    print(table(rows))
    chosen = stats["default"]
    print(f"auto chose backend {chosen['backend']}, dtype {chosen['dtype']} (CPU flags: {report['machine']['cpu_flags']})")
    for label, info in stats.items():
        print(f"  {label}: {info['backend']} {info['dtype']}: started in {info['start_s']:.1f} s, "
              f"RSS after warm-up {info['rss_mib_after_warmup']:.0f} MiB")
    print("half precision, relative L2 error against float32:", {k: f"{v:.4f}" for k, v in errors.items()})
    if memory:
        print(f"daemon RSS: {memory['rss_mib_after_100']:.0f} MiB after 100 frames, "
              f"{memory['rss_mib_after_total']:.0f} MiB after {memory['frames']}")
    print("batch sizes:", {k: v["batch_sizes"] for k, v in stats.items()})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
