"""Which backend runs a model's network, in which precision, and the forward pass each gives.

`auto` is a rule measured on CPUs (docs/performance.md), not a search at start-up:
- on an x86 CPU, OpenVINO when it is installed (it was the fastest there, in float32 and in
  bfloat16); else ONNX Runtime when it is installed and the CPU has no bfloat16 (torch's
  bfloat16 beat ONNX Runtime's float32 where there is); else torch;
- elsewhere (CUDA, ARM CPUs), torch: nothing else was measured there.
`dtype: auto` is the half precision the hardware computes natively (float16 on CUDA,
bfloat16 on a CPU with AMX or AVX-512-BF16), where the backend has it; otherwise float32.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from depthd.engine import hardware
from depthd.engine.backends.base import Forward, NetworkOutput, TorchForward
from depthd.engine.backends.export import ExportFailed, OnnxExports
from depthd.errors import InvalidArgument

BACKENDS = ("auto", "torch", "openvino", "onnxruntime")
EXTRAS = {"openvino": "openvino", "onnxruntime": "onnxruntime"}
"""backend -> the extra that installs it: pip install 'depthd[openvino]'."""
PRECISIONS = {
    "torch": (torch.float32, torch.float16, torch.bfloat16),
    "openvino": (torch.float32, torch.bfloat16),
    "onnxruntime": (torch.float32,),
}


def installed(backend: str) -> bool:
    return backend == "torch" or importlib.util.find_spec(backend) is not None


def candidates(spec: str | None, device: torch.device) -> list[str]:
    """The backends to try, in order: the one asked for, or `auto`'s choice then torch."""
    if spec not in (None, "auto"):
        if spec not in BACKENDS:
            raise InvalidArgument(f"backend: {spec!r} is not one of {', '.join(BACKENDS)}")
        if not installed(spec):
            raise InvalidArgument(f"backend: {spec} is not installed: pip install 'depthd[{EXTRAS[spec]}]'")
        if spec != "torch" and device.type != "cpu":
            raise InvalidArgument(f"backend: {spec} runs on the CPU in depthd; the model is on {device}: use torch")
        return [spec]
    if device.type != "cpu" or not hardware.is_x86():
        return ["torch"]
    if installed("openvino"):
        return ["openvino", "torch"]
    if installed("onnxruntime") and hardware.native_half_precision(device) is None:
        return ["onnxruntime", "torch"]
    return ["torch"]


def precision(spec: str | None, device: torch.device, backend: str) -> torch.dtype:
    """The dtype the network computes in: `spec`, or for auto the hardware's native half precision
    where this backend has it, else float32."""
    if spec in (None, "auto"):
        half = hardware.native_half_precision(device)
        return half if half in PRECISIONS[backend] else torch.float32
    dtype = getattr(torch, spec)
    if dtype not in PRECISIONS[backend]:
        names = ", ".join(str(d).removeprefix("torch.") for d in PRECISIONS[backend])
        raise InvalidArgument(f"dtype: {spec} is not available with backend {backend} (it has {names})")
    return dtype


class ExportedForward:
    """A network exported to ONNX, run by OpenVINO or ONNX Runtime: one compiled session per
    processed size, made the first time the size is seen (warm-up makes the configured ones),
    run once per frame of a batch."""

    input_dtype = torch.float32

    def __init__(self, runtime: Any, exports: OnnxExports, device: torch.device):
        self.backend = runtime.name
        self.precision = runtime.precision
        self.exports = exports
        self._runtime = runtime
        self._device = device
        self._sessions: dict[tuple[int, int], Callable] = {}

    def prepare(self, size: tuple[int, int]) -> None:
        """Export (or find on disk) and compile the network for frames processed at (height, width)."""
        if size not in self._sessions:
            self._sessions[size] = self._runtime.compile(self.exports.path_for(size))

    def __call__(self, pixel_values: torch.Tensor) -> NetworkOutput:
        size = (int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))
        self.prepare(size)
        session = self._sessions[size]
        frames = pixel_values.float().contiguous().cpu().numpy()
        outputs = [session(frames[i : i + 1]) for i in range(frames.shape[0])]
        depth = torch.from_numpy(np.concatenate([out[0] for out in outputs])).to(self._device)
        if len(outputs[0]) == 1:
            return NetworkOutput(depth)
        fov = torch.from_numpy(np.concatenate([out[1].reshape(-1) for out in outputs])).to(self._device)
        return NetworkOutput(depth, fov)


def exported(backend: str, exports: OnnxExports, dtype: torch.dtype, threads: int, cache: Path,
             device: torch.device) -> ExportedForward:
    from depthd.engine.backends.runtimes import RUNTIMES

    return ExportedForward(RUNTIMES[backend](dtype, threads, cache), exports, device)


__all__ = ["BACKENDS", "EXTRAS", "ExportFailed", "ExportedForward", "Forward", "NetworkOutput", "OnnxExports",
           "TorchForward", "candidates", "exported", "installed", "precision"]
