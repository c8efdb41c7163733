"""Which backend runs a model's network, in which precision, and the forward pass each gives.

`auto` is a rule measured on CPUs (docs/performance.md), not a search at start-up:
- on an x86 CPU, OpenVINO when it is installed (it was the fastest there, in float32 and in
  bfloat16); else ONNX Runtime when it is installed and the CPU has no bfloat16 (torch's
  bfloat16 beat ONNX Runtime's float32 where there is); else torch;
- on CUDA, ONNX Runtime when TensorRT is available through it (onnxruntime-gpu, and TensorRT's
  library loads), as the issue's rule has it; else torch. Not measured on a GPU here;
- elsewhere (ARM CPUs, other devices), torch: nothing else was measured there.
`dtype: auto` is the half precision the hardware computes natively (float16 on CUDA,
bfloat16 on a CPU with AMX or AVX-512-BF16), where the backend has it on that device;
otherwise float32.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from depthd.engine import hardware
from depthd.engine.backends import export, runtimes
from depthd.engine.backends.base import Forward, NetworkOutput, TorchForward
from depthd.engine.backends.export import ExportFailed, OnnxExports
from depthd.errors import InvalidArgument

BACKENDS = ("auto", "torch", "openvino", "onnxruntime")
EXTRAS = {
    ("openvino", "cpu"): "openvino",
    ("onnxruntime", "cpu"): "onnxruntime",
    ("onnxruntime", "cuda"): runtimes.GPU_EXTRA,
}
"""(backend, device type) -> the extra that installs it there: pip install 'depthd[onnxruntime-gpu]'.
A pair not here is one depthd does not run (OpenVINO on CUDA)."""
PRECISIONS = {
    ("torch", None): (torch.float32, torch.float16, torch.bfloat16),
    ("openvino", "cpu"): (torch.float32, torch.bfloat16),
    ("onnxruntime", "cpu"): (torch.float32,),
    ("onnxruntime", "cuda"): (torch.float32, torch.float16),
}
"""(backend, device type) -> the dtypes it computes in there; None: any device. ONNX Runtime's
float16 on CUDA is TensorRT's fp16 mode (the graph stays float32): without TensorRT, float32 only."""


def installed(backend: str) -> bool:
    return backend == "torch" or importlib.util.find_spec(backend) is not None


def precisions(backend: str, device: torch.device) -> tuple[torch.dtype, ...]:
    """The dtypes `backend` computes in on `device`; empty where it does not run there."""
    found = PRECISIONS.get((backend, device.type), PRECISIONS.get((backend, None), ()))
    if (backend, device.type) == ("onnxruntime", "cuda") and runtimes.TENSORRT not in runtimes.available_providers():
        found = tuple(dtype for dtype in found if dtype != torch.float16)
    return found


def tensorrt_available() -> bool:
    """Whether TensorRT can run a network through ONNX Runtime here."""
    return installed("onnxruntime") and runtimes.TENSORRT in runtimes.available_providers()


def candidates(spec: str | None, device: torch.device, dtype: str | None = None) -> list[str]:
    """The backends to try, in order: the one asked for, or `auto`'s choice then torch; for `auto`,
    only those that compute in `dtype` where one is asked for (torch has them all)."""
    if spec in (None, "auto"):
        if dtype in (None, "auto"):
            return _automatic(device)
        wanted = getattr(torch, dtype)
        return [name for name in _automatic(device) if wanted in precisions(name, device)] or ["torch"]
    return [_asked_for(spec, device)]


def _asked_for(spec: str, device: torch.device) -> str:
    if spec not in BACKENDS:
        raise InvalidArgument(f"backend: {spec!r} is not one of {', '.join(BACKENDS)}")
    if spec == "torch":
        return spec
    extra = EXTRAS.get((spec, device.type))
    if extra is None:
        devices = " or ".join(kind for name, kind in EXTRAS if name == spec)
        raise InvalidArgument(f"backend: {spec} runs on {devices} in depthd; the model is on {device}: use torch")
    if not installed(spec):
        raise InvalidArgument(f"backend: {spec} is not installed: pip install 'depthd[{extra}]'")
    if (spec, device.type) == ("onnxruntime", "cuda"):
        available = runtimes.available_providers()
        if not {runtimes.TENSORRT, runtimes.CUDA} & set(available):
            raise runtimes.no_gpu_provider(device, available)
    return spec


def _automatic(device: torch.device) -> list[str]:
    """`auto`'s rule (the module's docstring), then torch."""
    if device.type == "cuda":
        return ["onnxruntime", "torch"] if tensorrt_available() else ["torch"]
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
        return half if half in precisions(backend, device) else torch.float32
    dtype = getattr(torch, spec)
    found = precisions(backend, device)
    if dtype not in found:
        names = ", ".join(str(d).removeprefix("torch.") for d in found)
        raise InvalidArgument(f"dtype: {spec} is not available with backend {backend} on {device.type} (it has {names})")
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
        """Export (or find on disk) and compile the network for frames processed at (height, width);
        then hand what compiling freed (the graph read from the file) back to the system."""
        if size not in self._sessions:
            self._sessions[size] = self._runtime.compile(self.exports.path_for(size))
            export.release_freed_memory()

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
    return ExportedForward(runtimes.RUNTIMES[backend](dtype, threads, cache, device), exports, device)


__all__ = ["BACKENDS", "EXTRAS", "PRECISIONS", "ExportFailed", "ExportedForward", "Forward", "NetworkOutput",
           "OnnxExports", "TorchForward", "candidates", "exported", "installed", "precision", "precisions",
           "tensorrt_available"]
