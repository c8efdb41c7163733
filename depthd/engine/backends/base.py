"""What a backend is: something that runs a depth network's forward pass, and nothing else.

depthd's own pre- and post-processing stay in torch on the model's device whatever runs the
network, so every output form and the parity with transformers are shared by all backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class NetworkOutput:
    predicted_depth: torch.Tensor
    """(B, h, w) raw maps, as the network gives them."""
    field_of_view: torch.Tensor | None = None
    """(B,) degrees, for networks that estimate it (Depth Pro with its head)."""


class Forward(Protocol):
    backend: str
    """"torch", "openvino" or "onnxruntime"."""
    input_dtype: torch.dtype
    """The dtype pixel_values must have."""
    precision: torch.dtype
    """The precision the network computes in (bfloat16 with OpenVINO's bf16 hint takes float32 input)."""

    def __call__(self, pixel_values: torch.Tensor) -> NetworkOutput:
        """(B, 3, H, W) pixel values on the model's device -> the network's outputs on that device."""


class TorchForward:
    """The transformers model itself, eager or torch.compile'd."""

    backend = "torch"

    def __init__(self, model: Any, dtype: torch.dtype):
        self.model = model
        self.input_dtype = self.precision = dtype

    def __call__(self, pixel_values: torch.Tensor) -> NetworkOutput:
        outputs = self.model(pixel_values=pixel_values)
        return NetworkOutput(outputs.predicted_depth, getattr(outputs, "field_of_view", None))
