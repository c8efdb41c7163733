"""Tensor operations the recipes share, on the model's device: channel order, PIL's resize,
rescaling and normalisation, and zero padding added before the forward pass and cut after it.

Where transformers resizes through PIL, the resize here is PIL's filter (antialiased, with
the same support) on 0..255 values, rounded and clipped as PIL does, so the numbers match
without a PIL round trip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from depthd.domain import PixelFormat
from depthd.engine.plan import Plan, ProcessorConfig

PIL_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}
"""PIL resampling filter numbers (as saved in processor configs) and the torch mode that computes the same filter."""
APPROXIMATED = {1: "LANCZOS", 4: "BOX", 5: "HAMMING"}
"""PIL filters torch lacks: computed as bicubic."""


def torch_mode(resample: int) -> str:
    return PIL_MODES.get(resample, "bicubic")


def approximation(config: ProcessorConfig) -> str | None:
    """Why the resize is only close to transformers' (a PIL filter torch lacks), or None."""
    if config.do_resize and config.resample in APPROXIMATED:
        return f"PIL's {APPROXIMATED[config.resample]} filter is computed as bicubic"
    return None


def to_rgb(pixels: torch.Tensor, pixel_format: PixelFormat) -> torch.Tensor:
    """uint8 (B, H, W, C) or (B, H, W) in any pixel format -> uint8 (B, 3, H, W) RGB, as a view where possible."""
    if pixels.dim() == 3:
        pixels = pixels.unsqueeze(-1)
    x = pixels.permute(0, 3, 1, 2)
    if pixel_format is PixelFormat.GRAY8:
        return x.expand(-1, 3, -1, -1)
    if pixel_format in (PixelFormat.BGR8, PixelFormat.BGRA8):
        return x[:, [2, 1, 0]]
    return x[:, :3]


def pil_resize(x: torch.Tensor, size: tuple[int, int], resample: int) -> torch.Tensor:
    """Resize 0..255 float images as PIL resizes uint8 ones: its filter, rounded and clipped."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    mode = torch_mode(resample)
    if mode == "nearest-exact":
        return F.interpolate(x, size=size, mode=mode)
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True).round_().clamp_(0, 255)


def rescale(x: torch.Tensor, config: ProcessorConfig) -> torch.Tensor:
    return x * config.rescale_factor if config.do_rescale else x


def normalize(x: torch.Tensor, config: ProcessorConfig) -> torch.Tensor:
    if not config.do_normalize:
        return x
    mean = torch.tensor(config.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(config.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def pad_zeros(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    top, bottom, left, right = pad
    if top or bottom or left or right:
        return F.pad(x, (left, right, top, bottom), value=0.0)
    return x


def crop_padding(x: torch.Tensor, pad: tuple[int, int, int, int], processed: tuple[int, int]) -> torch.Tensor:
    """Cut the zero padding added after the resize off a map, scaled to the map's resolution."""
    top, bottom, left, right = pad
    if not (top or bottom or left or right):
        return x
    rows, cols = x.shape[-2:]
    sy, sx = rows / processed[0], cols / processed[1]
    return x[..., round(top * sy) : rows - round(bottom * sy), round(left * sx) : cols - round(right * sx)]


def resize_map(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(B, 1, h, w) float maps -> (B, 1, H, W), unless they already are that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def resized_input(images: torch.Tensor, plan: Plan, config: ProcessorConfig, dtype: torch.dtype) -> torch.Tensor:
    """The input of the DPT family and GLPN: resized as PIL would to the plan, rescaled, normalized and
    zero-padded."""
    x = pil_resize(images.float(), plan.resized, config.resample)
    return pad_zeros(normalize(rescale(x, config), config), plan.pad).to(dtype)


def unpadded_map(predicted: torch.Tensor, plan: Plan, out_size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) network maps without the plan's padding, resized bicubically to `out_size`."""
    x = crop_padding(predicted.float().unsqueeze(1), plan.pad, plan.processed)
    return resize_map(x, out_size, "bicubic").squeeze(1)
