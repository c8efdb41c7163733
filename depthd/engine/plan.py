"""How a frame is sized for its model: the saved processor config, the plan for one input size,
and the cap on the processed size that bounds what any frame can cost.

The config values are those of transformers' image processors (size, keep_aspect_ratio,
ensure_multiple_of, size_divisor, resample, rescale, normalize, do_pad), read from the
checkpoint's preprocessor_config.json over the architecture's defaults. Each recipe
turns them into a `Plan` for an input size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

DEFAULT_CAP_FACTOR = 2
"""Unless a model's `max_processed_side` says otherwise, frames are processed at most at twice
the long side of the checkpoint's own size (1036 for Depth Anything's 518)."""


@dataclass(frozen=True)
class Plan:
    """How one input size is processed: every frame with the same plan can share a tensor.

    The model sees the frame, mirrored outward by `reflect` (input pixels, ZoeDepth),
    resized to `resized`, then zero-padded by `pad` (the DPT family's size divisor, and
    the padding that keeps a very long, thin frame's aspect ratio within the size cap).
    Post-processing undoes the same steps in reverse.
    """

    input_size: tuple[int, int]
    resized: tuple[int, int]
    reflect: tuple[int, int, int, int] = (0, 0, 0, 0)
    """(top, bottom, left, right) mirrored before the resize."""
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)
    """(top, bottom, left, right) zeros added after the resize and normalisation."""

    @property
    def processed(self) -> tuple[int, int]:
        """The (height, width) of the tensor the model sees."""
        top, bottom, left, right = self.pad
        return self.resized[0] + top + bottom, self.resized[1] + left + right

    def padded_to(self, target: tuple[int, int]) -> "Plan":
        """This plan with its zero padding grown, centred, so that the processed size is `target`."""
        (height, width), (top, bottom, left, right) = self.processed, self.pad
        extra_h, extra_w = max(0, target[0] - height), max(0, target[1] - width)
        pad = (top + extra_h // 2, bottom + extra_h - extra_h // 2, left + extra_w // 2, right + extra_w - extra_w // 2)
        return Plan(self.input_size, self.resized, self.reflect, pad)


@dataclass(frozen=True)
class ProcessorConfig:
    """A model's saved image-processor config, resolved over its architecture's defaults."""

    do_resize: bool
    size: tuple[int, int] | None
    keep_aspect_ratio: bool
    ensure_multiple_of: float
    size_divisor: int | None
    resample: int
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    do_pad: bool

    @classmethod
    def from_saved(cls, saved: dict[str, Any], defaults: dict[str, Any]) -> "ProcessorConfig":
        values = {**defaults, **{k: v for k, v in saved.items() if v is not None}}
        size = values.get("size")
        if isinstance(size, dict):
            size = (int(size["height"]), int(size["width"])) if "height" in size else None
        elif isinstance(size, int):
            size = (size, size)
        return cls(
            do_resize=bool(values.get("do_resize", True)),
            size=size,
            keep_aspect_ratio=bool(values.get("keep_aspect_ratio", False)),
            ensure_multiple_of=values.get("ensure_multiple_of") or 1,
            size_divisor=values.get("size_divisor"),
            resample=int(values.get("resample", 2)),
            do_rescale=bool(values.get("do_rescale", True)),
            rescale_factor=float(values.get("rescale_factor", 1 / 255)),
            do_normalize=bool(values.get("do_normalize", False)),
            mean=tuple(float(v) for v in _triple(values.get("image_mean", 0.0))),
            std=tuple(float(v) for v in _triple(values.get("image_std", 1.0))),
            do_pad=bool(values.get("do_pad", False)),
        )

    def with_short_side(self, short_side: int) -> "ProcessorConfig":
        """This config with `size` scaled so that its short side is `short_side`, rounded to the
        multiple the model needs (never below one multiple)."""
        multiple = max(1, int(round(self.ensure_multiple_of)), self.size_divisor or 1)
        scale = max(multiple, round(short_side / multiple) * multiple) / min(self.size)
        size = tuple(max(multiple, round(side * scale / multiple) * multiple) for side in self.size)
        return dataclasses.replace(self, size=size)

    def fit(self, height: int, width: int) -> tuple[int, int]:
        """transformers' DPT/ZoeDepth output size: scale to `size`, keeping the aspect ratio
        by the smaller change when asked, then round to a multiple of `ensure_multiple_of`."""
        out_h, out_w = self.size
        scale_h = out_h / height
        scale_w = out_w / width
        if self.keep_aspect_ratio:
            if abs(1 - scale_w) < abs(1 - scale_h):
                scale_h = scale_w
            else:
                scale_w = scale_h
        multiple = self.ensure_multiple_of
        return int(round(scale_h * height / multiple) * multiple), int(round(scale_w * width / multiple) * multiple)


@dataclass(frozen=True)
class SizeCap:
    """The bounds on a processed frame: its long side at most `longest`, every side a multiple of `multiple`."""

    longest: int
    multiple: int

    def bound(self, natural: Plan, source: tuple[int, int]) -> Plan:
        """`natural` (what transformers would do) kept when it is within the cap; otherwise the
        frame scaled, keeping its aspect ratio, so that its long side fits the cap, each side rounded
        down to the multiple; a short side that would round to nothing is zero-padded up to one multiple.

        `source` is the (height, width) the resize starts from. This bounds the cost of a frame:
        with keep-aspect resizing a 518x6000 frame would otherwise give 15 000 tokens instead of 1 800.
        """
        multiple = self.multiple
        if max(natural.resized) <= self.longest and min(natural.resized) >= multiple:
            return natural
        longest = max(multiple, min(max(natural.resized), self.longest) // multiple * multiple)
        scale = longest / max(source)
        content, target = [], []
        for side in source:
            exact = side * scale
            rounded = int(exact // multiple * multiple)
            content.append(rounded if rounded >= multiple else max(1, round(exact)))
            target.append(max(rounded, multiple))
        plan = Plan(natural.input_size, (content[0], content[1]), reflect=natural.reflect)
        return plan.padded_to((target[0], target[1]))


def ceil_to(side: int, divisor: int) -> int:
    return math.ceil(side / divisor) * divisor


def _triple(value: Any) -> list[float]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * 3
