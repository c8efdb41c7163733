"""The runtimes that run an exported network: OpenVINO and ONNX Runtime, each behind `compile`.

A runtime turns one ONNX file (one processed size) into a callable from a float32 NCHW
array to the network's outputs. Both are optional installs (extras); importing this
module does not import them.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

logger = logging.getLogger(__name__)

Session = Callable[[np.ndarray], list[np.ndarray]]


class OpenVinoRuntime:
    """OpenVINO on the CPU. Half precision is its inference-precision hint (bf16, with float32
    input and output); compiled networks are cached by OpenVINO itself in `cache/openvino`."""

    name = "openvino"

    def __init__(self, precision: torch.dtype, threads: int, cache: Path):
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
    """ONNX Runtime's CPU execution provider, in float32."""

    name = "onnxruntime"

    def __init__(self, precision: torch.dtype, threads: int, cache: Path):
        import onnxruntime

        self.precision = precision
        self._options = onnxruntime.SessionOptions()
        self._options.intra_op_num_threads = threads
        self._options.inter_op_num_threads = 1
        self._options.log_severity_level = 3
        self._ort = onnxruntime

    def compile(self, onnx: Path) -> Session:
        session = self._ort.InferenceSession(str(onnx), self._options, providers=["CPUExecutionProvider"])
        logger.info("compiled backend=onnxruntime path=%s", onnx.name)

        def run(pixel_values: np.ndarray) -> list[np.ndarray]:
            return session.run(None, {"pixel_values": pixel_values})

        return run


RUNTIMES = {"openvino": OpenVinoRuntime, "onnxruntime": OnnxRuntimeRuntime}
