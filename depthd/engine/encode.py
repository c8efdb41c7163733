"""Turn float depth maps into the forms a caller asked for, on the model's device.

Everything here runs before the copy back to the host, so only the bytes that are
returned cross the bus: a float16 map is half the copy of a float32 one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from depthd.domain import DepthEncoding, DepthKind

UINT16_MAX = 65535


@dataclass
class EncodedMap:
    """One frame's outputs, still on the device."""

    depth: torch.Tensor
    stats: torch.Tensor
    """(2,) float32: min and max of the finite values of the float map."""
    visualization: torch.Tensor | None


def encode(
    depth: torch.Tensor,
    kind: DepthKind,
    encoding: DepthEncoding,
    visualization: bool,
    lut: torch.Tensor | None,
    vis_range: tuple[float, float] | None = None,
) -> EncodedMap:
    """A float32 (H, W) map -> the encoded map, its min/max, and the optional 8-bit visualization
    (coloured over `vis_range`, or over the map's own min and max)."""
    finite = torch.isfinite(depth)
    safe = torch.where(finite, depth, torch.zeros((), device=depth.device, dtype=depth.dtype))
    has_values = finite.any()
    lo = torch.where(has_values, torch.where(finite, depth, float("inf")).amin(), 0.0)
    hi = torch.where(has_values, torch.where(finite, depth, float("-inf")).amax(), 0.0)
    stats = torch.stack([lo, hi])
    if encoding is DepthEncoding.FLOAT16:
        out = depth.half()
    elif encoding is DepthEncoding.UINT16_MM:
        out = millimetres(safe)
    else:
        out = depth
    if visualization and vis_range is not None:
        vis = visualize(safe, *(torch.tensor(v, device=depth.device) for v in vis_range), kind, lut)
    else:
        vis = visualize(safe, lo, hi, kind, lut) if visualization else None
    return EncodedMap(out, stats, vis)


def millimetres(metres: torch.Tensor) -> torch.Tensor:
    """Metres -> uint16 millimetres, rounded; out of range saturates (0 below, 65535 above)."""
    return (metres * 1000.0).round_().clamp_(0, UINT16_MAX).to(torch.int32).to(torch.uint16)


def visualize(
    depth: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, kind: DepthKind, lut: torch.Tensor | None
) -> torch.Tensor:
    """The pipeline's 8-bit depth image, min-max per frame (or over a fixed range), but always near = bright.

    transformers' pipeline makes near bright for disparity and far bright for metric
    depth; here every kind shows near bright. A constant map gives black, never NaN.
    """
    span = hi - lo
    scaled = torch.where(span > 0, (depth - lo) / torch.where(span > 0, span, 1.0), torch.zeros_like(depth)).clamp(0, 1)
    if not kind.larger_is_nearer:
        scaled = torch.where(span > 0, 1.0 - scaled, scaled)
    gray = (scaled * 255).to(torch.uint8)
    return gray if lut is None else lut[gray.long()]
