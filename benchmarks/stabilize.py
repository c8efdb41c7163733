"""Flicker of a relative model's stream, with and without `stabilize`, on what a camera does to a
static scene: exposure (gain 0.7-1.3 and a small shift) and sensor noise, frame to frame.

    .venv/bin/python benchmarks/stabilize.py [--frames 60] [--json FILE]

Flicker is the per-pixel temporal standard deviation over the spatial standard deviation,
averaged over the frame. Each model's maps go through the engine and, for the stabilized run,
the engine's own Stabilizer, as a stream asking for `stabilize` would. Models, all relative:
  affine       a stand-in whose map is the image's blurred brightness (plus a constant): an
               exposure change moves it by a scale and a shift, as it moves a trained model's;
  tiny         the tests' tiny random Depth Anything;
  dav2s        Depth Anything V2 Small's architecture with random weights.
No trained weights can be downloaded here: how much of a trained model's flicker is scale and
shift (what stabilizing removes) is not measured. Timings only; nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers.modeling_outputs import DepthEstimatorOutput  # noqa: E402

from depthd.config import ModelSettings  # noqa: E402
from depthd.domain import Frame, OutputSpec  # noqa: E402
from depthd.engine import synthetic  # noqa: E402
from depthd.engine.engine import DepthEngine  # noqa: E402
from depthd.engine.geometry import Stabilizer  # noqa: E402


def camera_frames(count: int, width: int = 640, height: int = 480, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    floor = np.clip((y - 0.55) * 2.2, 0, 1)
    base = np.stack([0.35 + 0.3 * floor + 0.15 * x, 0.4 + 0.2 * np.sin(3 * x + 1), 0.55 - 0.3 * floor], -1) * 180 + 30
    return [np.clip(base * rng.uniform(0.7, 1.3) + rng.uniform(-8, 8) + rng.normal(0, 1.5, base.shape), 0, 255)
            .astype(np.uint8) for _ in range(count)]


def flicker(maps: np.ndarray) -> float:
    return float(maps.std(0).mean() / maps.mean(0).std())


def maps_of(engine: DepthEngine, frames: list[np.ndarray], stabilize: bool) -> np.ndarray:
    stabilizer = Stabilizer() if stabilize else None
    out = []
    for pixels in frames:
        prepared = engine.prepare([Frame(pixels)])
        [result] = engine.infer(prepared, [OutputSpec()], stabilizers=[stabilizer])
        out.append(result.depth.astype(np.float64))
    return np.stack(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--models", default="affine,tiny,dav2s")
    parser.add_argument("--json")
    args = parser.parse_args()
    frames = camera_frames(args.frames)
    rows = []
    with tempfile.TemporaryDirectory(prefix="depthd-stabilize-") as scratch:
        folders = {"affine": "depth_anything", "tiny": "depth_anything", "dav2s": "depth-anything-v2-small"}
        for name in args.models.split(","):
            engine = DepthEngine.load(ModelSettings(name, str(synthetic.build(folders[name], Path(scratch) / name))))
            if name == "affine":
                engine.checkpoint.model.forward = lambda pixel_values, **_: DepthEstimatorOutput(
                    predicted_depth=torch.nn.functional.avg_pool2d(pixel_values.mean(1, keepdim=True), 9, 1, 4)[:, 0] + 3)
            plain, stable = maps_of(engine, frames, False), maps_of(engine, frames, True)
            row = {"model": name, "frames": len(frames), "flicker": flicker(plain), "stabilized": flicker(stable),
                   "ratio": flicker(plain) / flicker(stable),
                   "first_frame_max_difference": float(np.abs(stable[0] - plain[0]).max())}
            rows.append(row)
            print(f"{name}: flicker {row['flicker']:.4f}, stabilized {row['stabilized']:.4f}: {row['ratio']:.1f}x less; "
                  f"first frame unchanged (max difference {row['first_frame_max_difference']:g})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"frames": "640x480, gain 0.7-1.3, shift +-8, noise 1.5", "rows": rows},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
