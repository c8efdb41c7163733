"""Camera geometry, on the model's device: focal lengths, point clouds, metric scale from a few
true depths, and the running reference that keeps a stream's relative maps from flickering.

Pixel centres sit at whole coordinates (the top-left pixel's centre is 0, 0), as in OpenCV and
ROS's CameraInfo; points are in the camera's optical frame: x right, y down, z forward, metres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from depthd.domain import MIN_HINTS, Alignment, DepthKind, Hint, Intrinsics

HINT_TOLERANCE = 0.1
"""A hint agrees with a fit when the fitted depth is within 10% of it (in inverse depth for
disparity): the others are outliers, rejected."""
MAX_HYPOTHESES = 512
STABLE_GRID = 64
"""The running reference of a stabilized stream is kept at most this many pixels a side."""
STABLE_WEIGHT = 0.2
"""How much of each aligned frame goes into the running reference."""
SCENE_CUT = 0.5
"""A frame that fits the reference this badly (residual RMS against the reference's own spread)
is a new scene: the reference starts again from it."""


def focal_length_px(field_of_view_deg: float, width: int) -> float:
    """The focal length, in pixels of an image `width` wide, of a camera with this horizontal field of view."""
    return 0.5 * width / math.tan(math.radians(field_of_view_deg) / 2)


def centred_intrinsics(focal: float, height: int, width: int) -> Intrinsics:
    """A camera of this focal length with its principal point at the image's centre."""
    return Intrinsics(focal, focal, (width - 1) / 2, (height - 1) / 2)


def back_project(depth: torch.Tensor, intrinsics: Intrinsics, stride: int) -> torch.Tensor:
    """(H, W) depth along z, metres -> (ceil(H/stride), ceil(W/stride), 3) float32 points of every
    stride-th row and column, in the optical frame; NaN where the depth is not finite and positive."""
    z = depth[::stride, ::stride].float()
    rows = torch.arange(0, depth.shape[0], stride, device=depth.device, dtype=torch.float32)
    columns = torch.arange(0, depth.shape[1], stride, device=depth.device, dtype=torch.float32)
    v, u = torch.meshgrid(rows, columns, indexing="ij")
    x = (u - intrinsics.cx) * z / intrinsics.fx
    y = (v - intrinsics.cy) * z / intrinsics.fy
    points = torch.stack([x, y, z], dim=-1)
    valid = torch.isfinite(z) & (z > 0)
    return torch.where(valid.unsqueeze(-1), points, torch.full_like(points, float("nan")))


def colours(rgb: torch.Tensor, size: tuple[int, int], stride: int) -> torch.Tensor:
    """uint8 (3, H, W) frame -> uint8 (rows, columns, 3): its colour at each point of a map of `size`."""
    x = rgb.unsqueeze(0).float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x[0, :, ::stride, ::stride].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8)


def sample(depth: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values of an (H, W) map at (N, 2) pixel coordinates (x, y) of that map."""
    height, width = depth.shape
    grid = torch.stack([(points[:, 0] + 0.5) / width * 2 - 1, (points[:, 1] + 0.5) / height * 2 - 1], dim=-1)
    values = F.grid_sample(depth[None, None].float(), grid.view(1, 1, -1, 2), mode="bilinear", align_corners=False)
    return values.view(-1)


@dataclass(frozen=True)
class Fitted:
    """A map made metric (or corrected) by its hints: the new map, and how."""

    depth: torch.Tensor
    alignment: Alignment


def fit_to_hints(depth: torch.Tensor, kind: DepthKind, hints: tuple[Hint, ...], input_size: tuple[int, int]) -> Fitted:
    """Fit the map to true depths at a few pixels of the input image, robustly (RANSAC on pairs,
    then least squares of the relative error on the agreeing hints):
    - relative disparity: 1/depth = scale * map + shift (inverse depth is what such a map is
      affine in; fitting depth itself would bias the far range);
    - relative depth: depth = scale * map + shift;
    - metric: depth = scale * map.
    Hints outside the image, not finite or not positive, or where the map has no value, are
    rejected and counted, as are the outliers of the fit. With fewer than 3 usable, the map is
    returned as it was, and `hints_used` says how many there were."""
    height, width = input_size
    usable = [h for h in hints if _usable(h, height, width)]
    rejected = len(hints) - len(usable)
    if len(usable) < MIN_HINTS:
        return Fitted(depth, Alignment(0.0, 0.0, len(usable), rejected, 0.0))
    sy, sx = depth.shape[0] / height, depth.shape[1] / width
    at = torch.tensor([[(h.x + 0.5) * sx - 0.5, (h.y + 0.5) * sy - 0.5] for h in usable], device=depth.device)
    values = sample(depth, at).double()
    truth = torch.tensor([h.depth_m for h in usable], device=depth.device, dtype=torch.float64)
    seen = torch.isfinite(values)
    rejected += int((~seen).sum())
    values, truth = values[seen], truth[seen]
    target = 1 / truth if kind is DepthKind.RELATIVE_DISPARITY else truth
    with_shift = kind is not DepthKind.METRIC
    fit = _ransac(values, target, with_shift)
    if fit is None:
        return Fitted(depth, Alignment(0.0, 0.0, 0, rejected + len(values), 0.0))
    scale, shift, inliers = fit
    model = scale * depth.double() + shift
    if kind is DepthKind.RELATIVE_DISPARITY:
        metric = torch.where(model > 0, 1 / model, torch.full_like(model, float("nan")))
        predicted = 1 / (scale * values[inliers] + shift)
    else:
        metric = torch.where(model > 0, model, torch.full_like(model, float("nan")))
        predicted = scale * values[inliers] + shift
    rmse = float(torch.sqrt(torch.mean((predicted - truth[inliers]) ** 2)))
    used = int(inliers.sum())
    alignment = Alignment(float(scale), float(shift), used, rejected + len(values) - used, rmse)
    return Fitted(metric.float(), alignment)


def _usable(hint: Hint, height: int, width: int) -> bool:
    return (
        math.isfinite(hint.x) and math.isfinite(hint.y) and math.isfinite(hint.depth_m) and hint.depth_m > 0
        and -0.5 <= hint.x <= width - 0.5 and -0.5 <= hint.y <= height - 0.5
    )


def _ransac(values: torch.Tensor, target: torch.Tensor, with_shift: bool):
    """(scale, shift, inlier mask) of target = scale * values + shift (shift 0 without `with_shift`),
    with scale > 0, agreeing with most points; None when fewer than MIN_HINTS agree."""
    count = len(values)
    if with_shift:
        first, second = torch.triu_indices(count, count, offset=1, device=values.device)
        if len(first) > MAX_HYPOTHESES:
            chosen = torch.randperm(len(first), generator=torch.Generator().manual_seed(count))[:MAX_HYPOTHESES]
            first, second = first[chosen.to(first.device)], second[chosen.to(first.device)]
        spread = values[first] - values[second]
        scales = (target[first] - target[second]) / torch.where(spread == 0, torch.ones_like(spread), spread)
        shifts = target[first] - scales * values[first]
        good = (spread != 0) & (scales > 0)
    else:
        scales = target / values
        shifts = torch.zeros_like(scales)
        good = scales > 0
    if not bool(good.any()):
        return None
    scales, shifts = scales[good], shifts[good]
    errors = ((scales[:, None] * values[None] + shifts[:, None] - target[None]) / target[None]).abs()
    agree = errors < HINT_TOLERANCE
    votes = agree.sum(1).double() - (errors * agree).sum(1) / (count + 1)  # most agreeing, then closest
    best = int(votes.argmax())
    inliers = agree[best]
    scale, shift = float(scales[best]), float(shifts[best])
    for _ in range(2):  # least squares of the relative error on the agreeing points, then agree again
        if int(inliers.sum()) < MIN_HINTS:
            return None
        scale, shift = _least_squares(values[inliers], target[inliers], with_shift)
        if scale <= 0:
            return None
        inliers = ((scale * values + shift - target) / target).abs() < HINT_TOLERANCE
    if int(inliers.sum()) < MIN_HINTS:
        return None
    return scale, shift, inliers


def _least_squares(values: torch.Tensor, target: torch.Tensor, with_shift: bool) -> tuple[float, float]:
    """Minimise sum(((scale * v + shift - t) / t)^2)."""
    weights = 1 / target**2
    if not with_shift:
        return float((weights * values * target).sum() / (weights * values * values).sum()), 0.0
    a = torch.stack([values, torch.ones_like(values)], dim=1) * weights.sqrt()[:, None]
    b = target * weights.sqrt()
    solution = torch.linalg.lstsq(a, b[:, None]).solution.view(-1)
    return float(solution[0]), float(solution[1])


class Stabilizer:
    """One stream's running reference for one model, which keeps its relative maps from flickering.

    A relative map has an unknown scale and shift of its own in every frame: an exposure change
    moves them. Each frame's map is aligned (scale and shift, least squares on a coarse grid,
    the worst-fitting tenth left out) to the reference, an exponential average of the aligned
    frames before it; the first frame starts the reference as it is. A frame that fits badly
    (SCENE_CUT), or of another size, starts a new reference. Used by one worker thread only.
    """

    def __init__(self) -> None:
        self.reference: torch.Tensor | None = None
        self.output_size: tuple[int, int] | None = None

    def __call__(self, depth: torch.Tensor) -> torch.Tensor:
        small = _coarse(depth)
        if self.reference is None or self.output_size != tuple(depth.shape):
            return self._restart(depth, small)
        valid = torch.isfinite(small) & torch.isfinite(self.reference)
        if int(valid.sum()) < 16:
            return self._restart(depth, small)
        current, reference = small[valid].double(), self.reference[valid].double()
        scale, shift = _affine(current, reference)
        residual = scale * current + shift - reference
        keep = residual.abs() <= torch.quantile(residual.abs(), 0.9)
        scale, shift = _affine(current[keep], reference[keep])
        error = torch.sqrt(torch.mean((scale * current + shift - reference) ** 2))
        if not math.isfinite(float(error)) or float(error) > SCENE_CUT * float(reference.std()):
            return self._restart(depth, small)
        self.reference = (1 - STABLE_WEIGHT) * self.reference + STABLE_WEIGHT * (scale * small + shift).float()
        return (scale * depth.double() + shift).float()

    def _restart(self, depth: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
        self.reference = small
        self.output_size = tuple(depth.shape)
        return depth


def _coarse(depth: torch.Tensor) -> torch.Tensor:
    height, width = depth.shape
    factor = max(1, math.ceil(max(height, width) / STABLE_GRID))
    if factor == 1:
        return depth.float()
    clean = torch.where(torch.isfinite(depth), depth, torch.zeros_like(depth)).float()
    return F.avg_pool2d(clean[None, None], factor, ceil_mode=True)[0, 0]


def _affine(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(scale, shift) of the least-squares y = scale * x + shift."""
    a = torch.stack([x, torch.ones_like(x)], dim=1)
    solution = torch.linalg.lstsq(a, y[:, None]).solution.view(-1)
    return float(solution[0]), float(solution[1])
