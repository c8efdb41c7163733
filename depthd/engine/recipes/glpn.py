"""The GLPN recipe, as transformers' GLPNImageProcessor: round each side down to a multiple of
32 (at least 32), rescale; afterwards resize the map bicubically to the size asked for."""

from __future__ import annotations

import torch

from depthd.domain import DepthKind
from depthd.engine.pixels import resized_input, unpadded_map
from depthd.engine.plan import Plan, ProcessorConfig
from depthd.engine.recipes.base import Architecture, cap_for

NATIVE_SIDE = 640
"""GLPN's processor has no size (it only rounds to 32): its checkpoints are trained on 640x480 (NYU)."""


class GlpnRecipe:
    def __init__(self, config: ProcessorConfig, max_processed_side: int | None = None):
        self.config = config
        self.divisor = int(config.size_divisor or 32)
        self.cap = cap_for(NATIVE_SIDE, self.divisor, max_processed_side)

    def plan(self, height: int, width: int) -> Plan:
        divisor = self.divisor
        natural = (max(divisor, height // divisor * divisor), max(divisor, width // divisor * divisor))
        return self.cap.bound(Plan((height, width), natural if self.config.do_resize else (height, width)), (height, width))

    def preprocess(self, images: torch.Tensor, plan: Plan, dtype: torch.dtype) -> torch.Tensor:
        return resized_input(images, plan, self.config, dtype)

    def postprocess(
        self, predicted: torch.Tensor, field_of_view: torch.Tensor | None, plan: Plan, out_size: tuple[int, int]
    ) -> torch.Tensor:
        return unpadded_map(predicted, plan, out_size)


ARCHITECTURES = (
    Architecture(
        "glpn", "GLPN", GlpnRecipe,
        {
            "do_resize": True,
            "size_divisor": 32,
            "resample": 2,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": False,
        },
        lambda _c: DepthKind.METRIC,
        classes=("GLPNForDepthEstimation",),
        resizable=False,
        fixed_size_reason="processes frames at their own size, rounded down to a multiple of 32",
    ),
)
