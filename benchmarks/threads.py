"""Torch CPU threads under contention: the forward pass with 1 or 2 threads, OpenMP waiting
actively (the default) or passively, on an idle machine and beside busy processes.

    .venv/bin/python benchmarks/threads.py [--model FOLDER] [--size HxW] [--json FILE]

Each configuration runs in a subprocess of its own (OpenMP reads OMP_WAIT_POLICY once, when
torch loads), timing the median of `--repeats` forward passes on a 640x480 frame's tensor;
"busy" runs start that many processes spinning in pure Python beside it. The default models
are the tiny test model and Depth Anything V2 Small, both with random weights. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MEASURE = r"""
import sys, time, torch
from transformers import AutoModelForDepthEstimation
torch.set_num_threads(int(sys.argv[2]))
model = AutoModelForDepthEstimation.from_pretrained(sys.argv[1]).eval()
x = torch.randn(1, 3, int(sys.argv[4]), int(sys.argv[5]))
times = []
with torch.inference_mode():
    model(pixel_values=x)
    for _ in range(int(sys.argv[3])):
        started = time.perf_counter()
        model(pixel_values=x)
        times.append(time.perf_counter() - started)
times.sort()
print(times[len(times) // 2] * 1000)
"""


def spin() -> None:
    while True:
        pass


def measure(model: str, threads: int, policy: str, busy: int, repeats: int, size: tuple[int, int]) -> float:
    env = {**os.environ}
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(busy)]
    for process in spinners:
        process.start()
    try:
        done = subprocess.run([sys.executable, "-c", MEASURE, model, str(threads), str(repeats), *map(str, size)],
                              env=env, capture_output=True, text=True, timeout=1800, check=True)
    finally:
        for process in spinners:
            process.terminate()
    return float(done.stdout.split()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="a checkpoint folder (repeatable)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", default="518x686", help="HxW of the input tensor (default 518x686: a 640x480 frame)")
    parser.add_argument("--json")
    args = parser.parse_args()
    from depthd.engine import synthetic

    scratch = Path(tempfile.mkdtemp(prefix="depthd-threads-"))
    models = args.model or [
        str(synthetic.build("depth_anything", scratch / "tiny")),
        str(synthetic.build("depth-anything-v2-small", scratch / "dav2s")),
    ]
    size = tuple(int(v) for v in args.size.split("x"))
    rows = []
    print(f"input {size[0]}x{size[1]}")
    print("| model | busy processes | threads | OMP_WAIT_POLICY | ms per forward |")
    print("|---|---|---|---|---|")
    for model in models:
        for busy in (0, 1, 2):
            for threads in (1, 2):
                for policy in ("default", "PASSIVE"):
                    ms = measure(model, threads, policy, busy, args.repeats, size)
                    rows.append({"model": Path(model).name, "size": list(size), "busy": busy, "threads": threads,
                                 "policy": policy, "ms": ms})
                    print(f"| {Path(model).name} | {busy} | {threads} | {policy} | {ms:.1f} |", flush=True)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    result = {"cpu": model or platform.processor(), "cores": os.cpu_count(),
              "flags": sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2"))), "rows": rows}
    if args.json:
        path = Path(args.json)
        earlier = json.loads(path.read_text())["rows"] if path.exists() else []
        result["rows"] = [r for r in earlier if r.get("size") not in (list(size), None)] + rows
        path.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
