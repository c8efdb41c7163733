"""Resident memory after warm-up of an exported backend, cold cache against warm, with and without
handing the export's freed torch weights back to the system (`malloc_trim`).

    .venv/bin/python benchmarks/export_memory.py [--backend openvino --dtype bfloat16] [--json FILE]

Depth Anything V2 Small's architecture with random weights. Each load runs in a process of its
own: the engine is loaded with `warmup_sizes` 480x640 and one 640x480 frame is estimated, then
the process's VmRSS (and VmHWM, its peak) is read from /proc/self/status. Cold: an empty cache
folder, so the process loads the torch weights, exports the ONNX file, drops the weights and
compiles. Warm: a second process on the same folder, which loads no torch weights. "no trim"
runs the same with `release_freed_memory` switched off (the code before it existed: it runs after
an export and after each compile). With OpenVINO, a third load finds the ONNX file but not
OpenVINO's compiled blob: what a daemon would hold if another process had exported for it. Runs
take turns, `--rounds` times. Linux only (/proc). Measures; nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

MODEL = "depth-anything-v2-small"


def status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(folder: str, cache: str, backend: str, dtype: str, trim: bool) -> None:
    """One load, one frame, then print what it cost as a JSON line."""
    import numpy as np

    from depthd.config import ModelSettings
    from depthd.domain import Frame, OutputSpec
    from depthd.engine.backends import export
    from depthd.engine.engine import DepthEngine

    if not trim:
        export.release_freed_memory = lambda: None
    started = time.perf_counter()
    engine = DepthEngine.load(ModelSettings("bench", folder, backend=backend, dtype=dtype,
                                            warmup_sizes=((480, 640),), cache_dir=cache))
    load_s = time.perf_counter() - started
    engine.estimate([Frame(np.full((480, 640, 3), 128, np.uint8))], [OutputSpec()])
    exports = engine._model.exports
    print(json.dumps({"rss_mib": status_mib("VmRSS"), "peak_mib": status_mib("VmHWM"), "load_s": load_s,
                      "exported": exports.exported, "found": exports.found,
                      "backend": engine.backend, "dtype": str(engine.dtype).removeprefix("torch.")}))


def run(folder: Path, cache: Path, backend: str, dtype: str, trim: bool) -> dict:
    command = [sys.executable, __file__, "--child", str(folder), str(cache), "--backend", backend, "--dtype", dtype]
    if not trim:
        command.append("--no-trim")
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="openvino")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "CACHE"), help=argparse.SUPPRESS)
    parser.add_argument("--no-trim", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.backend, args.dtype, trim=not args.no_trim)
        return 0

    from depthd.engine import hardware, synthetic

    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = synthetic.build(MODEL, Path(scratch) / "model")
        for round_ in range(args.rounds):
            for trim in (False, True):
                name = "trim" if trim else "no trim"
                cache = Path(scratch) / f"cache-{round_}-{name.replace(' ', '-')}"
                states = ["cold", "warm"]
                if trim and args.backend == "openvino":
                    states.append("cold compile, exported by another process")
                for state in states:
                    if state.startswith("cold compile"):
                        shutil.rmtree(cache / "openvino")  # the ONNX file stays: only OpenVINO's compile is cold
                    got = run(folder, cache, args.backend, args.dtype, trim)
                    results.setdefault(f"{name}, {state}", []).append(got)
                    print(f"round {round_ + 1} {name:7} {state}: RSS {got['rss_mib']:.0f} MiB, peak "
                          f"{got['peak_mib']:.0f} MiB, load {got['load_s']:.1f} s, exported {got['exported']}, "
                          f"found {got['found']} ({got['backend']} {got['dtype']})", flush=True)
    print(f"\n{hardware.describe_cpu()}")
    print(f"| {args.backend} {args.dtype} | RSS after warm-up (MiB, median) | peak (MiB) | load (s) |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        print(f"| {name} | {statistics.median(r['rss_mib'] for r in rows):.0f} | "
              f"{statistics.median(r['peak_mib'] for r in rows):.0f} | {statistics.median(r['load_s'] for r in rows):.1f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpu": hardware.describe_cpu(), "model": MODEL, "backend": args.backend,
                                         "dtype": args.dtype, "runs": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
