"""The Depth Pro recipe, as transformers' DepthProImageProcessor and its post-processing.

Rescale and normalise, then resize bilinearly (no antialiasing) to the model's fixed
size; afterwards make the canonical inverse depth metric with the estimated field of
view (when the model has its field-of-view head), resize bilinearly and invert.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from depthd.domain import DepthKind
from depthd.engine.pixels import normalize, rescale, resize_map, torch_mode
from depthd.engine.plan import Plan, ProcessorConfig
from depthd.engine.recipes.base import IMAGENET_STANDARD, Architecture, cap_for


class DepthProRecipe:
    def __init__(self, config: ProcessorConfig, max_processed_side: int | None = None):
        if config.do_resize and config.size is None:
            raise ValueError("the processor config's size must give height and width")
        self.config = config
        # always resized to the model's own size: the cap only matters without a resize
        self.cap = cap_for(max(config.size or (1536,)), 1, max_processed_side)

    def plan(self, height: int, width: int) -> Plan:
        if self.config.do_resize:
            return Plan((height, width), self.config.size)
        return self.cap.bound(Plan((height, width), (height, width)), (height, width))

    def preprocess(self, images: torch.Tensor, plan: Plan, dtype: torch.dtype) -> torch.Tensor:
        x = normalize(rescale(images.float(), self.config), self.config)
        if tuple(x.shape[-2:]) != plan.resized:
            x = F.interpolate(x, size=plan.resized, mode=torch_mode(self.config.resample), align_corners=False)
        return x.to(dtype)

    def postprocess(
        self, predicted: torch.Tensor, field_of_view: torch.Tensor | None, plan: Plan, out_size: tuple[int, int]
    ) -> torch.Tensor:
        inverse = predicted.float()
        if field_of_view is not None:
            inverse = metric_inverse_depth(inverse, field_of_view)
        return invert(resize_map(inverse.unsqueeze(1), out_size, "bilinear").squeeze(1))


def metric_inverse_depth(inverse: torch.Tensor, field_of_view: torch.Tensor) -> torch.Tensor:
    """Depth Pro's canonical inverse depth and field of view (degrees) -> inverse depth in 1/m.

    transformers scales by W / f with f = 0.5 W / tan(fov / 2); W cancels, leaving 2 tan(fov / 2).
    """
    scale = 2 * torch.tan(torch.deg2rad(field_of_view.float()) / 2)
    return inverse * scale.view(-1, 1, 1)


def invert(inverse: torch.Tensor) -> torch.Tensor:
    """Inverse depth -> depth, clamped as transformers does (to 1e-4 .. 1e4)."""
    return 1.0 / inverse.clamp(min=1e-4, max=1e4)


def _kind(config: Any) -> DepthKind:
    # Without its field-of-view head Depth Pro's inverse depth has no focal length to
    # make it metric: the map is depth times an unknown constant.
    return DepthKind.METRIC if getattr(config, "use_fov_model", False) else DepthKind.RELATIVE_DEPTH


ARCHITECTURES = (
    Architecture(
        "depth_pro", "Depth Pro", DepthProRecipe,
        {
            "do_resize": True,
            "size": {"height": 1536, "width": 1536},
            "resample": 2,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": IMAGENET_STANDARD,
            "image_std": IMAGENET_STANDARD,
        },
        _kind,
        classes=("DepthProForDepthEstimation",),
        resizable=False,
        fixed_size_reason="runs at its checkpoint's size only (its patch encoder is built for it)",
        estimates_focal_length=lambda config: getattr(config, "use_fov_model", False),
    ),
)
