"""Each backend and dtype against eager float32 torch, in the engine, on the same frames; and
input-size presets against the checkpoint's own size.

    .venv/bin/python benchmarks/backends.py [--json FILE]

Error is centred: ||got - ref|| / ||ref - mean(ref)||, the largest over 4 camera-like 640x480
frames, where ref is eager torch in float32 (the engine matches transformers there: the parity
tests). Models: every architecture's tiny model, and Depth Anything V2 Small's architecture with
random weights (for its timings). Input sizes: DA-V2-S on the `auto` backend and dtype, ms per
frame (median of 5 after warm-up), and the centred difference from the default size's map.
Exported networks are cached in a scratch folder, so every load here exports (cold).
Timings only; nothing asserts.
"""

from __future__ import annotations

import argparse
import json
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
from depthd.engine import backends, hardware, synthetic  # noqa: E402
from depthd.engine.engine import DepthEngine  # noqa: E402


def frames(count: int = 4) -> list[Frame]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640] / np.array([480, 640])[:, None, None]
    base = np.stack([0.4 + 0.3 * x, 0.5 + 0.2 * np.sin(4 * y), 0.6 - 0.3 * y], -1) * 200
    return [Frame(np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)) for _ in range(count)]


def maps(engine: DepthEngine, batch: list[Frame]) -> list[np.ndarray]:
    return [engine.estimate([f], [OutputSpec()])[0].depth for f in batch]


def centred(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    return max(float(np.linalg.norm(g - r) / np.linalg.norm(r - r.mean())) for g, r in zip(got, ref))


def ms_per_frame(engine: DepthEngine, frame: Frame, count: int = 5) -> float:
    engine.estimate([frame], [OutputSpec()])
    times = []
    for _ in range(count):
        started = time.perf_counter()
        engine.estimate([frame], [OutputSpec()])
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def variants() -> list[tuple[str, str]]:
    half = hardware.native_half_precision(torch.device("cpu")) is not None
    found = [("torch", "bfloat16")] if half else []
    for backend in ("openvino", "onnxruntime"):
        if backends.installed(backend):
            found.append((backend, "float32"))
            if half and torch.bfloat16 in backends.precisions(backend, torch.device("cpu")):
                found.append((backend, "bfloat16"))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sizes", default="518,392,266")
    args = parser.parse_args()
    batch = frames()
    report = {"cpu": hardware.describe_cpu(), "torch_threads": torch.get_num_threads(),
              "auto": backends.candidates("auto", torch.device("cpu"))[0], "errors": [], "input_sizes": []}
    with tempfile.TemporaryDirectory(prefix="depthd-backends-") as scratch:
        root = Path(scratch)
        names = [*synthetic.TINY, "depth-anything-v2-small"]
        for name in names:
            folder = synthetic.build(name, root / name)
            size = ((480, 640),)
            eager = DepthEngine.load(ModelSettings(name, str(folder), backend="torch", dtype="float32", warmup_sizes=size))
            reference = maps(eager, batch)
            real = name == "depth-anything-v2-small"
            base_ms = ms_per_frame(eager, batch[0], 3) if real else None
            for backend, dtype in variants():
                engine = DepthEngine.load(ModelSettings(name, str(folder), backend=backend, dtype=dtype,
                                                        warmup_sizes=size, cache_dir=str(root / "cache")))
                error = centred(maps(engine, batch), reference)
                row = {"model": name, "backend": backend, "dtype": dtype, "centred_error": error}
                if real:
                    row["ms_per_frame"] = ms_per_frame(engine, batch[0], 3)
                    row["eager_fp32_ms_per_frame"] = base_ms
                report["errors"].append(row)
                print(json.dumps(row), flush=True)
                del engine
            del eager
        folder = root / "depth-anything-v2-small"
        default = None
        for short in map(int, args.sizes.split(",")):
            engine = DepthEngine.load(ModelSettings("s", str(folder), input_size=short, warmup_sizes=((480, 640),),
                                                    cache_dir=str(root / "cache")))
            got = maps(engine, batch)
            default = default or got
            row = {"input_size": short, "processed": engine.processed_size(480, 640), "backend": engine.backend,
                   "dtype": str(engine.dtype).removeprefix("torch."), "ms_per_frame": ms_per_frame(engine, batch[0]),
                   "centred_difference_from_first": centred(got, default)}
            report["input_sizes"].append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
