"""What depthd knows of each depth architecture: its processing recipe, its defaults, its depth kind.

A checkpoint's `config.json` names its `model_type`; only the types listed here are
run. Each maps to one of four processing recipes (the way transformers' own image
processor for it resizes, pads and post-processes) and decides from the config, never
from values, what the numbers it returns mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from depthd.domain import DepthKind

IMAGENET_STANDARD = [0.5, 0.5, 0.5]


@dataclass(frozen=True)
class Architecture:
    model_type: str
    label: str
    recipe: str
    """One of "dpt" (DPT, Depth Anything, Prompt Depth Anything), "zoedepth", "glpn", "depth_pro"."""
    processor_defaults: dict[str, Any]
    """The image processor's class defaults, used for keys a saved config leaves out."""
    kind_of: Callable[[Any], DepthKind]
    flip_by_default: bool = False
    """Whether flip test-time augmentation is on unless configured (ZoeDepth, as in its original code)."""
    classes: tuple[str, ...] = ()
    """The depth-estimation model classes of this type that a checkpoint may name."""

    def kind(self, config: Any) -> DepthKind:
        return self.kind_of(config)


def _dpt_defaults(**overrides: Any) -> dict[str, Any]:
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


def _depth_pro_kind(config: Any) -> DepthKind:
    # Without its field-of-view head Depth Pro's inverse depth has no focal length to
    # make it metric: the map is depth times an unknown constant.
    return DepthKind.METRIC if getattr(config, "use_fov_model", False) else DepthKind.RELATIVE_DEPTH


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture(
            "dpt", "DPT", "dpt", _dpt_defaults(),
            lambda _c: DepthKind.RELATIVE_DISPARITY,
            classes=("DPTForDepthEstimation",),
        ),
        Architecture(
            "depth_anything", "Depth Anything", "dpt", _dpt_defaults(),
            _depth_anything_kind,
            classes=("DepthAnythingForDepthEstimation",),
        ),
        Architecture(
            # Without a prompt depth the head's output has no scale: its maps are
            # relative depth (the prompt, when given, is what makes them metres).
            "prompt_depth_anything", "Prompt Depth Anything", "dpt", _dpt_defaults(),
            lambda _c: DepthKind.RELATIVE_DEPTH,
            classes=("PromptDepthAnythingForDepthEstimation",),
        ),
        Architecture(
            "zoedepth", "ZoeDepth", "zoedepth",
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
        Architecture(
            "glpn", "GLPN", "glpn",
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
        ),
        Architecture(
            "depth_pro", "Depth Pro", "depth_pro",
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
            _depth_pro_kind,
            classes=("DepthProForDepthEstimation",),
        ),
    )
}


def supported_names() -> str:
    return ", ".join(f"{a.model_type} ({a.label})" for a in ARCHITECTURES.values())
