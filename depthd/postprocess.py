"""Post-processing in torch on the model's device: raw model output -> float32 depth at the asked size.

Each recipe follows what transformers' `post_process_depth_estimation` does for the
architecture: ZoeDepth's flip average and padding removal, Depth Pro's focal-length
scaling of its inverse depth, and the same interpolation transformers resizes with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from depthd.preprocess import Plan


def average_flipped(predicted: torch.Tensor) -> torch.Tensor:
    """(2B, h, w) of B frames then their mirrors -> (B, h, w), each averaged with its mirror's map."""
    half = predicted.shape[0] // 2
    return (predicted[:half] + predicted[half:].flip(-1)) / 2


def to_output_size(recipe: str, predicted: torch.Tensor, plan: Plan, out_size: tuple[int, int]) -> torch.Tensor:
    """float32 (B, h, w) raw maps of frames sharing `plan` -> (B, H, W) at `out_size`."""
    x = _crop(predicted.float().unsqueeze(1), plan.pad, plan.processed)
    if recipe == "zoedepth":
        return _zoedepth(x, plan, out_size).squeeze(1)
    mode = "bilinear" if recipe == "depth_pro" else "bicubic"
    if tuple(x.shape[-2:]) != tuple(out_size):
        x = F.interpolate(x, size=out_size, mode=mode, align_corners=False)
    return x.squeeze(1)


def depth_pro_metric(inverse: torch.Tensor, field_of_view: torch.Tensor) -> torch.Tensor:
    """Depth Pro's canonical inverse depth and field of view (degrees) -> inverse depth in 1/m.

    transformers scales by W / f with f = 0.5 W / tan(fov / 2); W cancels, leaving 2 tan(fov / 2).
    """
    scale = 2 * torch.tan(torch.deg2rad(field_of_view.float()) / 2)
    return inverse * scale.view(-1, 1, 1)


def invert_depth_pro(inverse: torch.Tensor) -> torch.Tensor:
    """Inverse depth -> depth, clamped as transformers does (to 1e-4 .. 1e4)."""
    return 1.0 / inverse.clamp(min=1e-4, max=1e4)


def focal_length_px(field_of_view_deg: float, width: int) -> float:
    return 0.5 * width / math.tan(math.radians(field_of_view_deg) / 2)


def _zoedepth(x: torch.Tensor, plan: Plan, out_size: tuple[int, int]) -> torch.Tensor:
    """Resize to the padded input size, cut the reflection padding off, then resize to the output."""
    top, bottom, left, right = plan.reflect
    height, width = plan.input_size
    x = F.interpolate(x, size=(height + top + bottom, width + left + right), mode="bicubic", align_corners=False)
    x = x[..., top : top + height, left : left + width]
    if (height, width) != tuple(out_size):
        x = F.interpolate(x, size=out_size, mode="bicubic", align_corners=False)
    return x


def _crop(x: torch.Tensor, padding: tuple[int, int, int, int], processed: tuple[int, int]) -> torch.Tensor:
    """Remove the zero padding added after the resize, scaled to the map's resolution."""
    top, bottom, left, right = padding
    if not (top or bottom or left or right):
        return x
    rows, cols = x.shape[-2:]
    sy, sx = rows / processed[0], cols / processed[1]
    return x[..., round(top * sy) : rows - round(bottom * sy), round(left * sx) : cols - round(right * sx)]
