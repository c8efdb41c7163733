"""What each engine knob does to one frame's forward pass and post-processing, on this machine.

    .venv/bin/python benchmarks/knobs.py                  # Depth Anything V2 Small, random weights
    .venv/bin/python benchmarks/knobs.py --model FOLDER --device cuda

Each row loads the model through the engine with one knob changed from the defaults
and times `infer` on a pre-processed 640x480 frame (the daemon's forward pass, with
its post-processing). The knobs take turns for `--rounds` rounds; the median counts.
Timings only; nothing asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from depthd.config import ModelSettings  # noqa: E402
from depthd.domain import Frame, OutputSpec  # noqa: E402
from depthd.engine import synthetic  # noqa: E402
from depthd.engine.engine import DepthEngine  # noqa: E402


def knobs(device: str) -> list[tuple[str, dict, int, int]]:
    """(label, engine options, frames per pass, torch threads; 0 = the default)."""
    rows = [
        ("default", {}, 1, 0),
        ("attention=eager", {"attention": "eager"}, 1, 0),
        ("channels_last off", {"channels_last": False}, 1, 0),
        ("dtype=bfloat16", {"dtype": "bfloat16"}, 1, 0),
        ("batch of 2 (per frame)", {}, 2, 0),
        ("compile", {"compile": True}, 1, 0),
    ]
    if device.startswith("cuda"):
        rows += [("dtype=float32", {"dtype": "float32"}, 1, 0), ("batch of 4 (per frame)", {}, 4, 0),
                 ("cuda_graphs", {"cuda_graphs": True}, 1, 0)]
    else:
        rows.insert(5, ("torch threads=1", {}, 1, 1))
    return rows


def workload(engine: DepthEngine, batch: int):
    """One call of the daemon's forward-and-post-process on a pre-processed 640x480 frame."""
    y, x = np.mgrid[0:480, 0:640]
    pixels = np.stack([x * 255 // 639, y * 255 // 479, (x + y) % 256], -1).astype(np.uint8)
    prepared = engine.prepare([Frame(pixels)] * batch)
    specs = [OutputSpec()] * batch
    engine.infer(prepared, specs)
    return lambda: engine.infer(prepared, specs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", help="comma-separated labels to run")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="depthd-knobs-") as scratch:
        folder = args.model or synthetic.build("depth-anything-v2-small", Path(scratch) / "model")
        runs = []
        for label, options, batch, threads in knobs(args.device):
            if args.only and label not in args.only.split(","):
                continue
            torch.set_num_threads(threads or default_threads)
            started = time.perf_counter()
            engine = DepthEngine.load(ModelSettings(label, str(folder), device=args.device, **options))
            engine.warmup(((480, 640),))
            runs.append((label, batch, threads or default_threads, workload(engine, batch), time.perf_counter() - started))
        # Every knob gets a turn in each round, so the machine's drift slows them all alike.
        times: dict[str, list[float]] = {label: [] for label, *_ in runs}
        for _ in range(args.rounds):
            for label, batch, threads, call, _ in runs:
                torch.set_num_threads(threads)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                started = time.perf_counter()
                call()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[label].append((time.perf_counter() - started) * 1000 / batch)
    print("| knob | ms per frame | vs first row | load and warm-up s |\n|---|---|---|---|")
    baseline = statistics.median(times[runs[0][0]])
    for label, _, _, _, warmup_s in runs:
        ms = statistics.median(times[label])
        print(f"| {label} | {ms:.0f} | {ms / baseline:.2f}× | {warmup_s:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
