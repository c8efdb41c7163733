"""The DPT recipe: DPT, Depth Anything and Prompt Depth Anything, as transformers' DPTImageProcessor.

Resize with PIL's filter (to a fixed size, or keeping the aspect ratio and rounding to a
multiple of the patch), rescale, normalise, optionally pad to a size divisor; afterwards
cut the padding and resize the map bicubically to the size asked for.
"""

from __future__ import annotations

from typing import Any

import torch

from depthd.domain import DepthKind
from depthd.engine.pixels import resized_input, unpadded_map
from depthd.engine.plan import Plan, ProcessorConfig, ceil_to
from depthd.engine.recipes.base import IMAGENET_STANDARD, Architecture, cap_for


class DptRecipe:
    def __init__(self, config: ProcessorConfig, max_processed_side: int | None = None):
        if config.do_resize and config.size is None:
            raise ValueError("the processor config's size must give height and width")
        self.config = config
        self.cap = cap_for(max(config.size or (384,)), max(1, int(round(config.ensure_multiple_of))), max_processed_side)

    def plan(self, height: int, width: int) -> Plan:
        config = self.config
        natural = config.fit(height, width) if config.do_resize else (height, width)
        plan = self.cap.bound(Plan((height, width), natural), (height, width))
        if config.do_pad and config.size_divisor:
            plan = plan.padded_to(tuple(ceil_to(side, config.size_divisor) for side in plan.processed))
        return plan

    def preprocess(self, images: torch.Tensor, plan: Plan, dtype: torch.dtype) -> torch.Tensor:
        return resized_input(images, plan, self.config, dtype)

    def postprocess(
        self, predicted: torch.Tensor, field_of_view: torch.Tensor | None, plan: Plan, out_size: tuple[int, int]
    ) -> torch.Tensor:
        return unpadded_map(predicted, plan, out_size)


def _defaults(**overrides: Any) -> dict[str, Any]:
    defaults = {
        "do_resize": True,
        "size": {"height": 384, "width": 384},
        "keep_aspect_ratio": False,
        "ensure_multiple_of": 1,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGENET_STANDARD,
        "image_std": IMAGENET_STANDARD,
        "do_pad": False,
        "size_divisor": None,
    }
    defaults.update(overrides)
    return defaults


def _depth_anything_kind(config: Any) -> DepthKind:
    if getattr(config, "depth_estimation_type", "relative") == "metric":
        return DepthKind.METRIC
    return DepthKind.RELATIVE_DISPARITY


ARCHITECTURES = (
    Architecture(
        "dpt", "DPT", DptRecipe, _defaults(),
        lambda _c: DepthKind.RELATIVE_DISPARITY,
        classes=("DPTForDepthEstimation",),
    ),
    Architecture(
        "depth_anything", "Depth Anything", DptRecipe, _defaults(),
        _depth_anything_kind,
        classes=("DepthAnythingForDepthEstimation",),
    ),
    Architecture(
        # Without a prompt depth the head's output has no scale: its maps are
        # relative depth (the prompt, when given, is what makes them metres).
        "prompt_depth_anything", "Prompt Depth Anything", DptRecipe, _defaults(),
        lambda _c: DepthKind.RELATIVE_DEPTH,
        classes=("PromptDepthAnythingForDepthEstimation",),
    ),
)
