"""What a recipe is: one architecture family's processing behind a small protocol, and the
architectures (transformers model types) that use it.

A recipe is built from the checkpoint's processor config and the size cap. It plans how a
frame of a given size is fed to the model, makes the model's input from uint8 frames on
the device, and turns the model's raw output back into depth at the size asked for, the
way transformers' own image processor for the family does. The engine calls these
hooks and never asks which recipe it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from depthd.domain import DepthKind
from depthd.engine.plan import Plan, ProcessorConfig, SizeCap

IMAGENET_STANDARD = [0.5, 0.5, 0.5]


class Recipe(Protocol):
    config: ProcessorConfig
    cap: SizeCap

    def plan(self, height: int, width: int) -> Plan:
        """How a frame of this size is processed (its size within the cap)."""

    def preprocess(self, images: torch.Tensor, plan: Plan, dtype: torch.dtype) -> torch.Tensor:
        """uint8 (B, 3, H, W) RGB frames on the device, all of one plan -> the model's pixel_values."""

    def postprocess(
        self, predicted: torch.Tensor, field_of_view: torch.Tensor | None, plan: Plan, out_size: tuple[int, int]
    ) -> torch.Tensor:
        """float32 (B, h, w) raw maps of frames sharing `plan` (and their field of view, if the model
        estimates one) -> float32 (B, H, W) depth in the kind's unit, at `out_size`."""


RecipeFactory = Callable[[ProcessorConfig, "int | None"], Recipe]
"""Builds a recipe from the processor config and the model's max_processed_side (None: the default)."""


@dataclass(frozen=True)
class Architecture:
    """A transformers model type depthd runs: its recipe, its processor's defaults, what its numbers mean."""

    model_type: str
    label: str
    recipe: RecipeFactory
    processor_defaults: dict[str, Any]
    """The image processor's class defaults, used for keys a saved config leaves out."""
    kind_of: Callable[[Any], DepthKind]
    """Decided from the model's config, never from values."""
    flip_by_default: bool = False
    """Whether flip test-time augmentation is on unless configured (ZoeDepth, as in its original code)."""
    classes: tuple[str, ...] = ()
    """The depth-estimation model classes of this type that a checkpoint may name."""
    resizable: bool = True
    """Whether the network runs at another input size than the checkpoint's (input_size)."""
    fixed_size_reason: str = "processes frames at one size"
    estimates_focal_length: Callable[[Any], bool] = lambda _config: False
    """Whether the model estimates the camera's field of view (Depth Pro with its head): its
    outputs then carry `field_of_view`, and a point cloud needs no intrinsics from the request."""

    def kind(self, config: Any) -> DepthKind:
        return self.kind_of(config)


def cap_for(native_side: int, multiple: int, max_processed_side: int | None) -> SizeCap:
    from depthd.engine.plan import DEFAULT_CAP_FACTOR

    return SizeCap(max_processed_side or DEFAULT_CAP_FACTOR * native_side, multiple)
