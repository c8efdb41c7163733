"""Random-weight depth checkpoints built from config values, for tests, benchmarks and the demo.

Nothing here is a usable depth model: the weights are random, so the maps mean
nothing. What is real is the arithmetic. The "tiny" checkpoints have a few hundred
thousand parameters and exist so that tests and `depthd serve --demo` run every
architecture offline; the "real" ones repeat the published configuration values
of well-known checkpoints, so that benchmarks measure the true cost of a forward
pass without downloading anything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
HALF_MEAN = [0.5, 0.5, 0.5]
HALF_STD = [0.5, 0.5, 0.5]
BILINEAR = 2
BICUBIC = 3


def _processor(image_processor_type: str, **values: Any) -> dict[str, Any]:
    base = {
        "image_processor_type": image_processor_type,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
    }
    base.update(values)
    return base


def _dpt_family_processor(size: int, multiple: int, keep_aspect_ratio: bool, mean, std) -> dict[str, Any]:
    return _processor(
        "DPTImageProcessor",
        size={"height": size, "width": size},
        keep_aspect_ratio=keep_aspect_ratio,
        ensure_multiple_of=multiple,
        resample=BICUBIC,
        image_mean=mean,
        image_std=std,
        do_pad=False,
    )


def _dinov2(hidden: int, layers: int, heads: int, out_indices: list[int], image_size: int = 518, **extra):
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        patch_size=14,
        image_size=image_size,
        out_indices=out_indices,
        reshape_hidden_states=False,
        apply_layernorm=True,
        **extra,
    )


def _beit(hidden: int, layers: int, heads: int, intermediate: int, out_stages: list[int]):
    """ZoeDepth's BEiT backbone at 384x384, with relative position bias as in the published checkpoints."""
    from transformers import BeitConfig

    return BeitConfig(
        image_size=384,
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        use_relative_position_bias=True,
        reshape_hidden_states=False,
        out_features=[f"stage{i}" for i in out_stages],
    )


def _zoedepth_processor() -> dict[str, Any]:
    return _processor(
        "ZoeDepthImageProcessor",
        size={"height": 384, "width": 512},
        keep_aspect_ratio=True,
        ensure_multiple_of=32,
        resample=BILINEAR,
        do_pad=True,
        image_mean=HALF_MEAN,
        image_std=HALF_STD,
    )


# --- tiny checkpoints: one per supported architecture -------------------------------------


def _smooth_pixels(height: int, width: int):
    """A normalised, smoothly varying test pattern: the kind of input a camera gives."""
    import torch

    y = torch.linspace(0, 1, height).view(height, 1)
    x = torch.linspace(0, 1, width).view(1, width)
    channels = [torch.sin(6 * x + 2 * y), torch.cos(5 * y - 3 * x), torch.sin(4 * x * y + 1)]
    return torch.stack(channels).unsqueeze(0)


def _calibrate_head(model, size: tuple[int, int], mean: float, std: float) -> None:
    """Rescale the last convolution of the depth head so its output has the given mean and std.

    A randomly initialised head gives maps of about 1e-8, mostly clipped to zero by the
    final ReLU, or a saturated sigmoid: maps that hardly change with the image, against
    which any preprocessing would pass a parity test. An affine change of the last layer
    keeps the random features but spreads the map.
    """
    import torch

    last = [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    seen = {}
    hook = last.register_forward_hook(lambda _m, _i, out: seen.setdefault("out", out))
    with torch.no_grad():
        model.eval()(pixel_values=_smooth_pixels(*size))
        hook.remove()
        out = seen["out"]
        scale = std / float(out.std())
        last.weight.mul_(scale)
        last.bias.copy_((last.bias - float(out.mean())) * scale + mean)


def _calibrate_field_of_view(model, size: tuple[int, int], degrees: float) -> None:
    """Shift Depth Pro's random field-of-view head to answer about `degrees` (it starts near 0)."""
    import torch

    last = [m for m in model.fov_model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        fov = float(model.eval()(pixel_values=_smooth_pixels(*size)).field_of_view.flatten()[0])
        last.bias.add_(degrees - fov)



def _tiny_depth_anything(metric: bool = False):
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation

    config = DepthAnythingConfig(
        backbone_config=_dinov2(32, 4, 2, [1, 2, 3, 4], mlp_ratio=2),
        reassemble_hidden_size=32,
        patch_size=14,
        neck_hidden_sizes=[16, 24, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        depth_estimation_type="metric" if metric else "relative",
        max_depth=20 if metric else 1,
    )
    model = DepthAnythingForDepthEstimation(config)
    # relative: a ReLU map around 1; metric: a sigmoid spread over its range
    _calibrate_head(model, (518, 518), *((0.0, 1.5) if metric else (1.0, 0.3)))
    return model, _dpt_family_processor(518, 14, True, IMAGENET_MEAN, IMAGENET_STD)


def _tiny_prompt_depth_anything():
    from transformers import PromptDepthAnythingConfig, PromptDepthAnythingForDepthEstimation

    config = PromptDepthAnythingConfig(
        backbone_config=_dinov2(32, 4, 2, [1, 2, 3, 4], mlp_ratio=2),
        reassemble_hidden_size=32,
        patch_size=14,
        neck_hidden_sizes=[16, 24, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
    )
    processor = _dpt_family_processor(518, 14, True, IMAGENET_MEAN, IMAGENET_STD)
    processor["image_processor_type"] = "PromptDepthAnythingImageProcessor"
    processor["prompt_scale_to_meter"] = 0.001
    model = PromptDepthAnythingForDepthEstimation(config)
    _calibrate_head(model, (518, 518), 1.0, 0.3)
    return model, processor


def _tiny_dpt():
    from transformers import DPTConfig, DPTForDepthEstimation

    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=384,
        patch_size=16,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[16, 24, 32, 32],
        fusion_hidden_size=16,
    )
    model = DPTForDepthEstimation(config)
    _calibrate_head(model, (384, 384), 1.0, 0.3)
    return model, _dpt_family_processor(384, 1, False, HALF_MEAN, HALF_STD)


def _tiny_dpt_hybrid():
    from transformers import DPTConfig, DPTForDepthEstimation

    backbone = {
        "global_padding": "same",
        "layer_type": "bottleneck",
        "depths": [1, 1, 1],
        "out_features": ["stage1", "stage2", "stage3"],
        "embedding_dynamic_padding": True,
        "embedding_size": 16,
        "hidden_sizes": [16, 32, 64],
        "num_groups": 2,
    }
    config = DPTConfig(
        is_hybrid=True,
        backbone_config=backbone,
        backbone_featmap_shape=[1, 64, 24, 24],
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=384,
        patch_size=16,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[16, 32, 32, 32],
        fusion_hidden_size=16,
        readout_type="project",
    )
    model = DPTForDepthEstimation(config)
    _calibrate_head(model, (384, 384), 1.0, 0.3)
    return model, _dpt_family_processor(384, 1, False, HALF_MEAN, HALF_STD)


def _tiny_zoedepth():
    from transformers import ZoeDepthConfig, ZoeDepthForDepthEstimation

    backbone = _beit(hidden=32, layers=4, heads=2, intermediate=64, out_stages=[1, 2, 3, 4])
    config = ZoeDepthConfig(
        backbone_config=backbone,
        neck_hidden_sizes=[16, 24, 32, 32],
        fusion_hidden_size=16,
        num_relative_features=8,
        bottleneck_features=16,
        bin_embedding_dim=16,
        num_attractors=[4, 2, 2, 1],
        # One domain, as Intel/zoedepth-nyu: the two-domain router of zoedepth-nyu-kitti has
        # hard-coded sizes in transformers (128 features, 4 layers) that no tiny model can meet.
        bin_configurations=[{"name": "nyu", "n_bins": 16, "min_depth": 1e-3, "max_depth": 10.0}],
        # With the default 0.02 the random metric head saturates to a constant map.
        initializer_range=0.2,
    )
    return ZoeDepthForDepthEstimation(config), _zoedepth_processor()


def _tiny_glpn():
    from transformers import GLPNConfig, GLPNForDepthEstimation

    config = GLPNConfig(
        hidden_sizes=[8, 16, 24, 32],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 1, 2, 2],
        decoder_hidden_size=16,
        max_depth=10,
        # With the default 0.02 the random head gives an almost flat map.
        initializer_range=0.1,
    )
    processor = _processor("GLPNImageProcessor", size_divisor=32, resample=BILINEAR, do_normalize=False)
    return GLPNForDepthEstimation(config), processor


def _tiny_depth_pro():
    from transformers import DepthProConfig, DepthProForDepthEstimation

    def encoder():
        return {"model_type": "dinov2", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                "mlp_ratio": 2, "patch_size": 8, "image_size": 64}

    config = DepthProConfig(
        patch_size=64,
        fusion_hidden_size=16,
        intermediate_hook_ids=[1, 0],
        intermediate_feature_dims=[8, 8],
        scaled_images_ratios=[0.25, 0.5, 1],
        scaled_images_overlap_ratios=[0.0, 0.5, 0.25],
        scaled_images_feature_dims=[16, 16, 8],
        use_fov_model=True,
        image_model_config=encoder(),
        patch_model_config=encoder(),
        fov_model_config=encoder(),
    )
    processor = _processor(
        "DepthProImageProcessor",
        size={"height": 256, "width": 256},
        resample=BILINEAR,
        image_mean=HALF_MEAN,
        image_std=HALF_STD,
    )
    model = DepthProForDepthEstimation(config)
    _calibrate_head(model, (256, 256), 1.0, 0.25)
    _calibrate_field_of_view(model, (256, 256), degrees=55.0)
    return model, processor


TINY: dict[str, Callable[[], tuple[Any, dict[str, Any]]]] = {
    "dpt": _tiny_dpt,
    "dpt_hybrid": _tiny_dpt_hybrid,
    "depth_anything": _tiny_depth_anything,
    "depth_anything_metric": lambda: _tiny_depth_anything(metric=True),
    "prompt_depth_anything": _tiny_prompt_depth_anything,
    "zoedepth": _tiny_zoedepth,
    "glpn": _tiny_glpn,
    "depth_pro": _tiny_depth_pro,
}


# --- real architectures with random weights, for benchmarks ------------------------------


def _depth_anything_v2(hidden: int, heads: int, neck: list[int], fusion: int):
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation

    config = DepthAnythingConfig(
        backbone_config=_dinov2(hidden, 12, heads, [3, 6, 9, 12]),
        reassemble_hidden_size=hidden,
        patch_size=14,
        neck_hidden_sizes=neck,
        fusion_hidden_size=fusion,
    )
    return DepthAnythingForDepthEstimation(config), _dpt_family_processor(518, 14, True, IMAGENET_MEAN, IMAGENET_STD)


def _dpt_large():
    from transformers import DPTConfig, DPTForDepthEstimation

    config = DPTConfig(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        image_size=384,
        patch_size=16,
        backbone_out_indices=[5, 11, 17, 23],
        neck_hidden_sizes=[256, 512, 1024, 1024],
        fusion_hidden_size=256,
        readout_type="project",
    )
    model = DPTForDepthEstimation(config)
    _calibrate_head(model, (384, 384), 1.0, 0.3)
    return model, _dpt_family_processor(384, 1, False, HALF_MEAN, HALF_STD)


def _zoedepth_nyu_kitti():
    from transformers import ZoeDepthConfig, ZoeDepthForDepthEstimation

    backbone = _beit(hidden=1024, layers=24, heads=16, intermediate=4096, out_stages=[6, 12, 18, 24])
    config = ZoeDepthConfig(
        backbone_config=backbone,
        neck_hidden_sizes=[256, 512, 1024, 1024],
        bin_centers_type="softplus",
        bin_configurations=[
            {"name": "nyu", "n_bins": 64, "min_depth": 1e-3, "max_depth": 10.0},
            {"name": "kitti", "n_bins": 64, "min_depth": 1e-3, "max_depth": 80.0},
        ],
        num_patch_transformer_layers=4,
        patch_transformer_hidden_size=128,
        patch_transformer_intermediate_size=1024,
        patch_transformer_num_attention_heads=4,
    )
    return ZoeDepthForDepthEstimation(config), _zoedepth_processor()


REAL: dict[str, Callable[[], tuple[Any, dict[str, Any]]]] = {
    "depth-anything-v2-small": lambda: _depth_anything_v2(384, 6, [48, 96, 192, 384], 64),
    "depth-anything-v2-base": lambda: _depth_anything_v2(768, 12, [96, 192, 384, 768], 128),
    "dpt-large": _dpt_large,
    "zoedepth-nyu-kitti": _zoedepth_nyu_kitti,
}


def build(name: str, folder: str | Path, *, seed: int = 0) -> Path:
    """Build the named random-weight checkpoint and save it, with its processor config, into `folder`.

    `name` is a key of TINY or REAL. The folder loads like any hub checkpoint.
    """
    import torch

    builders = {**TINY, **REAL}
    if name not in builders:
        raise KeyError(f"unknown synthetic model {name!r}; known: {', '.join(sorted(builders))}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = builders[name]()
    model.config.depthd_synthetic = name
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return folder


def parameter_count(folder: str | Path) -> int:
    """Parameters stored in a saved checkpoint, read from its safetensors header (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for path in Path(folder).glob("*.safetensors"):
        with safe_open(str(path), framework="numpy") as handle:
            for key in handle.keys():
                total += math.prod(handle.get_slice(key).get_shape())
    return total


def main(argv: list[str] | None = None) -> int:
    """`python -m depthd.engine.synthetic NAME FOLDER`: write a random-weight checkpoint for benchmarks."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m depthd.engine.synthetic",
        description="Build a random-weight depth checkpoint (for benchmarks and tests; its depth means nothing).",
    )
    parser.add_argument("name", choices=sorted({**TINY, **REAL}))
    parser.add_argument("folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = build(args.name, args.folder, seed=args.seed)
    print(f"{args.name}: {parameter_count(folder) / 1e6:.1f} M parameters, random weights, in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
