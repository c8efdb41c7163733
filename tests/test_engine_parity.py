"""Parity: the engine's float32 depth equals transformers' own result on the same model and image.

The reference is `pipeline("depth-estimation")` wherever it runs. Two architectures
need more, because their transformers post-processing goes through torchvision,
which cannot be installed here:
- ZoeDepth: the processor, a forward on the image and on its mirror, and the
  processor's own `post_process_depth_estimation` (flip average, padding removal),
  with torchvision's resize supplied by its float-tensor equivalent, F.interpolate;
- Depth Pro: its processor's documented steps by hand (rescale and normalise, then a
  bilinear resize without antialiasing), the forward, then the processor's own
  `post_process_depth_estimation` (field-of-view scaling, resize, inversion).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from scenes import scene

from depthd.config import ModelSettings
from depthd.domain import DepthKind, Frame, OutputSpec
from depthd.engine.engine import DepthEngine
from depthd.engine.synthetic import TINY

IMAGES = {"landscape": (640, 480), "portrait": (360, 480), "odd": (375, 500)}
TOLERANCE = 0.02

EXPECTED_KIND = {
    "dpt": DepthKind.RELATIVE_DISPARITY,
    "dpt_hybrid": DepthKind.RELATIVE_DISPARITY,
    "depth_anything": DepthKind.RELATIVE_DISPARITY,
    "depth_anything_metric": DepthKind.METRIC,
    "prompt_depth_anything": DepthKind.RELATIVE_DEPTH,
    "zoedepth": DepthKind.METRIC,
    "glpn": DepthKind.METRIC,
    "depth_pro": DepthKind.METRIC,
}


class _TorchvisionFunctional:
    """What transformers' post-processing uses of torchvision.transforms.v2.functional, for float tensors."""

    class InterpolationMode:
        BICUBIC = "bicubic"
        BILINEAR = "bilinear"

    @staticmethod
    def resize(tensor, size, interpolation, antialias=True):
        return F.interpolate(tensor[None], size=list(size), mode=interpolation, align_corners=False, antialias=antialias)[0]


@lru_cache(maxsize=None)
def _pipeline(folder: str):
    from transformers import pipeline

    return pipeline("depth-estimation", model=folder)


@lru_cache(maxsize=None)
def _model(folder: str):
    from transformers import AutoModelForDepthEstimation

    return AutoModelForDepthEstimation.from_pretrained(folder).eval()


def _zoedepth_reference(folder: str, image: Image.Image, monkeypatch) -> np.ndarray:
    from transformers import AutoImageProcessor
    from transformers.models.zoedepth import image_processing_pil_zoedepth

    monkeypatch.setattr(image_processing_pil_zoedepth, "tvF", _TorchvisionFunctional, raising=False)
    processor = AutoImageProcessor.from_pretrained(folder)
    model = _model(folder)
    with torch.no_grad():
        outputs = model(**processor(image, return_tensors="pt"))
        mirrored = model(**processor(ImageOps.mirror(image), return_tensors="pt"))
    result = processor.post_process_depth_estimation(
        outputs, source_sizes=[image.size[::-1]], outputs_flipped=mirrored
    )
    return result[0]["predicted_depth"].numpy()


def _depth_pro_module(monkeypatch):
    """transformers' Depth Pro processor module, importable with a stand-in for torchvision."""
    from transformers.image_utils import PILImageResampling

    package = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    v2 = types.ModuleType("torchvision.transforms.v2")
    v2.functional = _TorchvisionFunctional
    for name, module in (("torchvision", package), ("torchvision.transforms", transforms), ("torchvision.transforms.v2", v2)):
        monkeypatch.setitem(sys.modules, name, module)
    import transformers.models.depth_pro as package_module

    # Loaded from its file: the lazy package would refuse it for want of torchvision.
    name = "transformers.models.depth_pro.image_processing_depth_pro"
    spec = importlib.util.spec_from_file_location(name, Path(package_module.__file__).parent / "image_processing_depth_pro.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    mapping = {PILImageResampling.BILINEAR: types.SimpleNamespace(value="bilinear")}
    monkeypatch.setattr(module, "pil_torch_interpolation_mapping", mapping)
    return module


def _depth_pro_reference(folder: str, image: Image.Image, monkeypatch) -> np.ndarray:
    saved = json.loads((Path(folder) / "preprocessor_config.json").read_text())
    module = _depth_pro_module(monkeypatch)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() * saved["rescale_factor"]
    mean = torch.tensor(saved["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(saved["image_std"]).view(1, 3, 1, 1)
    x = (x - mean) / std
    size = (saved["size"]["height"], saved["size"]["width"])
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
    with torch.no_grad():
        outputs = _model(folder)(pixel_values=x)
    processor = types.SimpleNamespace(resample=saved["resample"])
    result = module.DepthProImageProcessor.post_process_depth_estimation(
        processor, outputs, target_sizes=[image.size[::-1]]
    )
    return result[0]["predicted_depth"].numpy()


def reference(architecture: str, folder: str, image: Image.Image, monkeypatch) -> np.ndarray:
    if architecture == "zoedepth":
        return _zoedepth_reference(folder, image, monkeypatch)
    if architecture == "depth_pro":
        return _depth_pro_reference(folder, image, monkeypatch)
    return _pipeline(folder)(image)["predicted_depth"].numpy()


@lru_cache(maxsize=None)
def _engine(folder: str) -> DepthEngine:
    return DepthEngine.load(ModelSettings("m", folder))


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """||got - ref|| / ||ref - mean(ref)||: error against the reference's own variation."""
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref - ref.mean()))


@pytest.mark.parametrize("image_name", list(IMAGES))
@pytest.mark.parametrize("architecture", list(TINY))
def test_engine_matches_transformers(architecture, image_name, tiny_models, monkeypatch):
    folder = str(tiny_models[architecture])
    width, height = IMAGES[image_name]
    pixels = scene(width, height, seed=len(image_name))
    ref = reference(architecture, folder, Image.fromarray(pixels), monkeypatch)
    # A reference that hardly changes with the image would let any preprocessing pass.
    assert ref.std() > 1e-3 * abs(ref.mean()) + 1e-6

    result = _engine(folder).estimate([Frame(pixels)], [OutputSpec()])[0]

    assert result.depth.shape == (height, width) == ref.shape
    assert result.depth.dtype == np.float32
    assert result.kind is EXPECTED_KIND[architecture]
    error = relative_error(result.depth, ref)
    assert error < TOLERANCE, f"{architecture} {image_name}: relative L2 error {error:.4f}"
    print(f"parity {architecture:22s} {image_name:9s} {width}x{height}: {error:.5f}")
