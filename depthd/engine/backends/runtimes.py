"""The runtimes that run an exported network: OpenVINO and ONNX Runtime, each behind `compile`.

A runtime turns one ONNX file (one processed size) into a callable from a float32 NCHW
array to the network's outputs. Both are optional installs (extras); importing this
module does not import them. OpenVINO runs on the CPU; ONNX Runtime on the CPU, or on a
CUDA device through its TensorRT or CUDA execution provider (`providers_for`).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from depthd.engine.backends.export import ExportFailed
from depthd.errors import InvalidArgument

logger = logging.getLogger(__name__)

Session = Callable[[np.ndarray], list[np.ndarray]]

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
GPU_EXTRA = "onnxruntime-gpu"
TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvinfer.so.8")
Provider = tuple[str, dict[str, Any]]
"""An ONNX Runtime execution provider's name and its options, as InferenceSession takes them."""


def available_providers() -> tuple[str, ...]:
    """The execution providers this machine's onnxruntime can offer (tests fake it here): those it
    was built with (`get_available_providers()`), less TensorRT where TensorRT's library does not
    load, for onnxruntime-gpu lists TensorRT whether or not TensorRT is installed. Empty without
    onnxruntime. CUDA's is kept as listed: on a CUDA device torch has loaded CUDA's libraries."""
    if importlib.util.find_spec("onnxruntime") is None:
        return ()
    import onnxruntime

    found = tuple(onnxruntime.get_available_providers())
    if TENSORRT in found and not _tensorrt_loads():
        found = tuple(name for name in found if name != TENSORRT)
    return found


def _tensorrt_loads() -> bool:
    """Whether TensorRT's libnvinfer loads: from the loader's path, or from the `tensorrt` wheel
    (importing it loads its libraries, which ONNX Runtime then finds in the process)."""
    for library in TENSORRT_LIBRARIES:
        try:
            ctypes.CDLL(library)
            return True
        except OSError:
            continue
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import tensorrt  # noqa: F401
    except Exception:  # a broken install is "not available", whatever it raises
        return False
    return True


def providers_for(device: torch.device, dtype: torch.dtype, available: list[str] | tuple[str, ...],
                  cache: Path) -> list[Provider]:
    """ONNX Runtime's execution providers for a network on `device` computing in `dtype`, first
    choice first, from those this onnxruntime `available`ly has (`get_available_providers()`).

    On the CPU: the CPU provider. On CUDA: TensorRT (its fp16 mode for float16; its engines and
    timing cache under `cache/tensorrt`, one folder per precision, since an engine is built for
    one), then CUDA, then the CPU for any operation neither takes. float16 is TensorRT's: the
    graph stays float32 and the CUDA provider would run it so, so it is refused without TensorRT.
    Raises InvalidArgument naming the onnxruntime-gpu extra where there is no GPU provider."""
    if device.type != "cuda":
        return [(CPU, {})]
    if dtype not in (torch.float32, torch.float16):
        raise InvalidArgument(f"dtype: {str(dtype).removeprefix('torch.')} is not available with backend onnxruntime "
                              f"on {device} (it has float32, and float16 with TensorRT)")
    index = device.index if device.index is not None else 0
    chosen: list[Provider] = []
    if TENSORRT in available:
        half = dtype == torch.float16
        chosen.append((TENSORRT, {
            "device_id": index,
            "trt_fp16_enable": half,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache / "tensorrt" / ("fp16" if half else "fp32")),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache / "tensorrt"),
        }))
    if CUDA in available:
        chosen.append((CUDA, {"device_id": index}))
    if not chosen:
        raise no_gpu_provider(device, available)
    if dtype == torch.float16 and chosen[0][0] != TENSORRT:
        raise InvalidArgument(f"dtype: float16 with backend onnxruntime on {device} is TensorRT's fp16 mode, and "
                              "this onnxruntime has no TensorRT: use float32")
    return chosen + [(CPU, {})]


def no_gpu_provider(device: torch.device, available: list[str] | tuple[str, ...]) -> InvalidArgument:
    """The error of a CUDA model on an onnxruntime without a GPU provider (the CPU package, most likely)."""
    return InvalidArgument(
        f"backend: onnxruntime on {device} needs ONNX Runtime's TensorRT or CUDA execution provider, and this "
        f"onnxruntime has neither (it has {', '.join(available) or 'none'}): pip uninstall onnxruntime; "
        f"pip install 'depthd[{GPU_EXTRA}]'"
    )


def check_providers(asked: list[Provider], got: list[str]) -> None:
    """ONNX Runtime lists every provider it was built with, and a session whose provider cannot load
    (TensorRT or CUDA libraries missing) quietly runs on the next. Raise ExportFailed when the first
    choice did not load, so that `auto` goes on to torch and a named backend fails to load, with the cause."""
    first = asked[0][0]
    if first not in got:
        raise ExportFailed(f"ONNX Runtime could not start its {first} (its libraries did not load: TensorRT's "
                           f"libnvinfer, CUDA or cuDNN); the session has {', '.join(got)}")


class OpenVinoRuntime:
    """OpenVINO on the CPU. Half precision is its inference-precision hint (bf16, with float32
    input and output); compiled networks are cached by OpenVINO itself in `cache/openvino`."""

    name = "openvino"

    def __init__(self, precision: torch.dtype, threads: int, cache: Path, device: torch.device):
        openvino = _openvino_without_telemetry()
        self.precision = precision
        self._core = openvino.Core()
        self._core.set_property({"CACHE_DIR": str(cache / "openvino")})
        self._config = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == torch.bfloat16 else "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
        }

    def compile(self, onnx: Path) -> Session:
        compiled = self._core.compile_model(str(onnx), "CPU", self._config)
        logger.info("compiled backend=openvino path=%s from_cache=%s", onnx.name,
                    bool(compiled.get_property("LOADED_FROM_CACHE")))
        request = compiled.create_infer_request()
        outputs = compiled.outputs

        def run(pixel_values: np.ndarray) -> list[np.ndarray]:
            results = request.infer({0: pixel_values})
            return [np.array(results[output]) for output in outputs]

        return run


def _openvino_without_telemetry():
    """`import openvino`, keeping its telemetry package out: on import it would fork a process to
    report usage over the network, from a daemon whose gRPC threads are running (a fork there is
    unsafe) and on a robot that should not phone home. OpenVINO uses a no-op stand-in without it."""
    blocked = "openvino_telemetry" not in sys.modules
    if blocked:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # makes its import fail
    try:
        import openvino
    finally:
        if blocked:
            del sys.modules["openvino_telemetry"]
    return openvino


class OnnxRuntimeRuntime:
    """ONNX Runtime: on the CPU its CPU execution provider, in float32; on CUDA TensorRT's (float32
    or its fp16 mode) or CUDA's, as `providers_for` chooses. Frames go in and come out as CPU arrays."""

    name = "onnxruntime"

    def __init__(self, precision: torch.dtype, threads: int, cache: Path, device: torch.device):
        import onnxruntime

        self.precision = precision
        self._options = onnxruntime.SessionOptions()
        self._options.intra_op_num_threads = threads
        self._options.inter_op_num_threads = 1
        self._options.log_severity_level = 3
        self._ort = onnxruntime
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.providers = providers_for(device, precision, available_providers(), cache)
        for _, options in self.providers:
            for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
                if key in options:
                    Path(options[key]).mkdir(parents=True, exist_ok=True)

    def compile(self, onnx: Path) -> Session:
        session = self._ort.InferenceSession(str(onnx), self._options, providers=self.providers)
        check_providers(self.providers, session.get_providers())
        logger.info("compiled backend=onnxruntime path=%s providers=%s", onnx.name, ",".join(session.get_providers()))

        def run(pixel_values: np.ndarray) -> list[np.ndarray]:
            return session.run(None, {"pixel_values": pixel_values})

        return run


RUNTIMES = {"openvino": OpenVinoRuntime, "onnxruntime": OnnxRuntimeRuntime}
