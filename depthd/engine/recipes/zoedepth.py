"""The ZoeDepth recipe, as transformers' ZoeDepthImageProcessor and its post-processing.

Mirror the frame outward (ZoeDepth's reflection padding), resize keeping the aspect
ratio to a multiple of 32, normalise; afterwards resize the map to the mirrored input's
size, cut the mirrored border off, and resize to the size asked for.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from depthd.domain import DepthKind
from depthd.engine.pixels import PIL_MODES, crop_padding, normalize, pad_zeros, rescale, resize_map
from depthd.engine.plan import Plan, ProcessorConfig
from depthd.engine.recipes.base import IMAGENET_STANDARD, Architecture, cap_for


def reflection_padding(height: int, width: int) -> tuple[int, int]:
    """ZoeDepth's reflection padding: int(sqrt(side / 2) * 3) on each side, as in its original code."""
    return int(math.sqrt(height / 2) * 3), int(math.sqrt(width / 2) * 3)


class ZoeDepthRecipe:
    def __init__(self, config: ProcessorConfig, max_processed_side: int | None = None):
        if config.do_resize and config.size is None:
            raise ValueError("the processor config's size must give height and width")
        if config.resample not in (2, 3):
            raise ValueError(f"ZoeDepth resizes with bilinear or bicubic only, the config asks for resample={config.resample}")
        self.config = config
        self.cap = cap_for(max(config.size or (512,)), max(1, int(round(config.ensure_multiple_of))), max_processed_side)

    def plan(self, height: int, width: int) -> Plan:
        pad_h, pad_w = reflection_padding(height, width) if self.config.do_pad else (0, 0)
        padded = (height + 2 * pad_h, width + 2 * pad_w)
        natural = self.config.fit(*padded) if self.config.do_resize else padded
        return self.cap.bound(Plan((height, width), natural, reflect=(pad_h, pad_h, pad_w, pad_w)), padded)

    def preprocess(self, images: torch.Tensor, plan: Plan, dtype: torch.dtype) -> torch.Tensor:
        x = rescale(images.float(), self.config)
        top, bottom, left, right = plan.reflect
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom), mode="reflect")
        if tuple(x.shape[-2:]) != plan.resized:
            x = F.interpolate(x, size=plan.resized, mode=PIL_MODES[self.config.resample], align_corners=True)
        return pad_zeros(normalize(x, self.config), plan.pad).to(dtype)

    def postprocess(
        self, predicted: torch.Tensor, field_of_view: torch.Tensor | None, plan: Plan, out_size: tuple[int, int]
    ) -> torch.Tensor:
        x = crop_padding(predicted.float().unsqueeze(1), plan.pad, plan.processed)
        top, bottom, left, right = plan.reflect
        height, width = plan.input_size
        x = F.interpolate(x, size=(height + top + bottom, width + left + right), mode="bicubic", align_corners=False)
        x = x[..., top : top + height, left : left + width]
        return resize_map(x, out_size, "bicubic").squeeze(1)


ARCHITECTURES = (
    Architecture(
        "zoedepth", "ZoeDepth", ZoeDepthRecipe,
        {
            "do_resize": True,
            "size": {"height": 384, "width": 512},
            "keep_aspect_ratio": True,
            "ensure_multiple_of": 1 / 32,
            "resample": 2,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": IMAGENET_STANDARD,
            "image_std": IMAGENET_STANDARD,
            "do_pad": True,
        },
        lambda _c: DepthKind.METRIC,
        flip_by_default=True,
        classes=("ZoeDepthForDepthEstimation",),
    ),
)
