"""Pre-processing in torch on the model's device, following each model's saved processor config.

The rules are those of transformers' image processors (size, keep_aspect_ratio,
ensure_multiple_of, size_divisor, resample, rescale, normalize, ZoeDepth's reflection
padding), computed on a batch of uint8 frames already on the device. Where
transformers resizes through PIL, the resize is PIL's filter (antialiased, with the
same support) on 0..255 values, rounded and clipped as PIL does, so the numbers
match without a PIL round trip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from depthd.domain import PixelFormat

# PIL resampling filter numbers (as saved in processor configs) and the torch mode
# that computes the same filter.
_PIL_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}
_APPROXIMATED = {1: "LANCZOS", 4: "BOX", 5: "HAMMING"}

DEFAULT_CAP_FACTOR = 2
"""Unless a model's `max_processed_side` says otherwise, frames are processed at most at twice
the long side of the checkpoint's own size (1036 for Depth Anything's 518)."""
GLPN_NATIVE_SIDE = 640
"""GLPN's processor has no size (it only rounds to 32): its checkpoints are trained on 640x480 (NYU)."""


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


@dataclass(frozen=True)
class Preprocessing:
    """A model's preprocessing, resolved from its processor config over its architecture's defaults."""

    recipe: str
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
    max_side: int | None = None
    """The cap on the longest processed side; None: DEFAULT_CAP_FACTOR times `native_side`."""

    @classmethod
    def from_config(cls, recipe: str, saved: dict[str, Any], defaults: dict[str, Any]) -> "Preprocessing":
        values = {**defaults, **{k: v for k, v in saved.items() if v is not None}}
        size = values.get("size")
        if isinstance(size, dict):
            size = (int(size["height"]), int(size["width"])) if "height" in size else None
        elif isinstance(size, int):
            size = (size, size)
        return cls(
            recipe=recipe,
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

    def check(self) -> str | None:
        """A reason this config cannot be followed, or None."""
        if self.recipe in ("dpt", "zoedepth", "depth_pro") and self.do_resize and self.size is None:
            return "the processor config's size must give height and width"
        if self.recipe == "zoedepth" and self.resample not in (2, 3):
            return f"ZoeDepth resizes with bilinear or bicubic only, the config asks for resample={self.resample}"
        return None

    def approximation(self) -> str | None:
        """Why the resize is only close to transformers' (a PIL filter torch lacks), or None."""
        if self.do_resize and self.resample in _APPROXIMATED:
            return f"PIL's {_APPROXIMATED[self.resample]} filter is computed as bicubic"
        return None

    # --- sizes -------------------------------------------------------------------------

    @property
    def native_side(self) -> int:
        """The long side of the size the checkpoint was made for; the size cap is a multiple of it."""
        if self.size is not None:
            return max(self.size)
        return GLPN_NATIVE_SIDE

    @property
    def multiple(self) -> int:
        """What every processed side must be a multiple of (a patch, or the network's stride)."""
        if self.recipe == "glpn":
            return int(self.size_divisor or 32)
        return max(1, int(round(self.ensure_multiple_of)))

    @property
    def largest_side(self) -> int:
        """The longest processed side this model runs at: larger frames are scaled down within it."""
        return self.max_side or DEFAULT_CAP_FACTOR * self.native_side

    def plan(self, height: int, width: int) -> Plan:
        if self.recipe == "depth_pro":
            return Plan((height, width), self.size if self.do_resize else (height, width))
        if self.recipe == "zoedepth":
            pad_h, pad_w = zoedepth_padding(height, width) if self.do_pad else (0, 0)
            reflect = (pad_h, pad_h, pad_w, pad_w)
            padded = (height + 2 * pad_h, width + 2 * pad_w)
            natural = self._fit(*padded) if self.do_resize else padded
            return self._bounded(Plan((height, width), natural, reflect=reflect), padded)
        if self.recipe == "glpn":
            divisor = self.multiple
            natural = (max(divisor, height // divisor * divisor), max(divisor, width // divisor * divisor))
            return self._bounded(Plan((height, width), natural if self.do_resize else (height, width)), (height, width))
        natural = self._fit(height, width) if self.do_resize else (height, width)
        plan = self._bounded(Plan((height, width), natural), (height, width))
        if self.do_pad and self.size_divisor:
            target = tuple(math.ceil(side / self.size_divisor) * self.size_divisor for side in plan.processed)
            plan = _padded_to(plan, target)
        return plan

    def _bounded(self, natural: Plan, source: tuple[int, int]) -> Plan:
        """`natural` (what transformers would do) kept when it is within the size cap; otherwise the
        frame scaled, keeping its aspect ratio, so that its long side fits the cap, each side rounded
        down to the multiple; a short side that would round to nothing is zero-padded up to one multiple.

        `source` is the (height, width) the resize starts from. This bounds the cost of a frame:
        with keep-aspect resizing a 518x6000 frame would otherwise give 15 000 tokens instead of 1 800.
        """
        multiple, cap = self.multiple, self.largest_side
        if max(natural.resized) <= cap and min(natural.resized) >= multiple:
            return natural
        longest = max(multiple, min(max(natural.resized), cap) // multiple * multiple)
        scale = longest / max(source)
        content, target = [], []
        for side in source:
            exact = side * scale
            rounded = int(exact // multiple * multiple)
            content.append(rounded if rounded >= multiple else max(1, round(exact)))
            target.append(max(rounded, multiple))
        plan = Plan(natural.input_size, (content[0], content[1]), reflect=natural.reflect)
        return _padded_to(plan, (target[0], target[1]))

    def _fit(self, height: int, width: int) -> tuple[int, int]:
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

    # --- the work ------------------------------------------------------------------------

    def __call__(self, images: torch.Tensor, plan: Plan, dtype: torch.dtype) -> torch.Tensor:
        """uint8 (B, 3, H, W) RGB on the device -> the model's pixel_values, in `dtype`."""
        x = images.float()
        if self.recipe == "zoedepth":
            x = self._rescale(x)
            top, bottom, left, right = plan.reflect
            if top or bottom or left or right:
                x = F.pad(x, (left, right, top, bottom), mode="reflect")
            if tuple(x.shape[-2:]) != plan.resized:
                mode = _PIL_MODES[self.resample]
                x = F.interpolate(x, size=plan.resized, mode=mode, align_corners=True)
            x = self._normalize(x)
        elif self.recipe == "depth_pro":
            x = self._normalize(self._rescale(x))
            if tuple(x.shape[-2:]) != plan.resized:
                x = F.interpolate(x, size=plan.resized, mode=_torch_mode(self.resample), align_corners=False)
        else:
            x = pil_resize(x, plan.resized, self.resample)
            x = self._normalize(self._rescale(x))
        top, bottom, left, right = plan.pad
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom), value=0.0)
        return x.to(dtype)

    def _rescale(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.rescale_factor if self.do_rescale else x

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.do_normalize:
            return x
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std


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
    mode = _torch_mode(resample)
    if mode == "nearest-exact":
        return F.interpolate(x, size=size, mode=mode)
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True).round_().clamp_(0, 255)


def zoedepth_padding(height: int, width: int) -> tuple[int, int]:
    """ZoeDepth's reflection padding: int(sqrt(side / 2) * 3) on each side, as in its original code."""
    return int(math.sqrt(height / 2) * 3), int(math.sqrt(width / 2) * 3)


def _torch_mode(resample: int) -> str:
    return _PIL_MODES.get(resample, "bicubic")


def _padded_to(plan: Plan, target: tuple[int, int]) -> Plan:
    """`plan` with its zero padding grown, centred, so that the processed size is `target`."""
    (height, width), (top, bottom, left, right) = plan.processed, plan.pad
    extra_h, extra_w = max(0, target[0] - height), max(0, target[1] - width)
    pad = (top + extra_h // 2, bottom + extra_h - extra_h // 2, left + extra_w // 2, right + extra_w - extra_w // 2)
    return Plan(plan.input_size, plan.resized, plan.reflect, pad)


def _triple(value: Any) -> list[float]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * 3
