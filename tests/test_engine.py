"""Engine behaviour beyond parity: output forms, batching, pixel formats, load errors, warm-up."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from scenes import scene

from depthd.config import ModelSettings, Settings
from depthd.domain import DepthEncoding, DepthKind, Frame, OutputSpec, PixelFormat
from depthd.engine.encode import visualize
from depthd.engine.engine import DepthEngine
from depthd.errors import InvalidArgument, ModelLoadError, NotFound, Unavailable, UnsupportedArchitecture
from depthd.serving.pool import ModelPool


@pytest.fixture(scope="module")
def relative(tiny_models) -> DepthEngine:
    return DepthEngine.load(ModelSettings("relative", str(tiny_models["depth_anything"])))


@pytest.fixture(scope="module")
def metric(tiny_models) -> DepthEngine:
    return DepthEngine.load(ModelSettings("metric", str(tiny_models["depth_anything_metric"])))


def test_millimetres_refused_for_a_relative_model(relative):
    with pytest.raises(InvalidArgument, match="output.encoding: UINT16_MM needs a metric model"):
        relative.estimate([Frame(scene(64, 48))], [OutputSpec(encoding=DepthEncoding.UINT16_MM)])


def test_output_forms_of_a_metric_map_agree(metric):
    frame = Frame(scene(96, 64))
    forms = [
        OutputSpec(),
        OutputSpec(encoding=DepthEncoding.FLOAT16),
        OutputSpec(encoding=DepthEncoding.UINT16_MM, visualization=True, colormap="turbo"),
    ]
    as_float, as_half, as_mm = metric.estimate([frame] * 3, forms)

    assert as_float.kind is DepthKind.METRIC
    assert (as_half.depth.dtype, as_mm.depth.dtype) == (np.float16, np.uint16)
    np.testing.assert_allclose(as_half.depth, as_float.depth, rtol=1e-3, atol=1e-3)
    expected_mm = np.clip(np.round(as_float.depth * 1000), 0, 65535)
    assert np.abs(as_mm.depth.astype(np.int64) - expected_mm).max() <= 1
    assert as_float.min == pytest.approx(float(as_float.depth.min()))
    assert as_float.max == pytest.approx(float(as_float.depth.max()))
    assert as_mm.visualization.shape == (64, 96, 3) and as_mm.visualization.dtype == np.uint8


def test_visualization_is_near_bright_and_constant_maps_are_black():
    ramp = torch.linspace(1, 10, 100).view(10, 10)
    lo, hi = ramp.min(), ramp.max()
    disparity = visualize(ramp, lo, hi, DepthKind.RELATIVE_DISPARITY, None)
    metres = visualize(ramp, lo, hi, DepthKind.METRIC, None)
    # larger disparity is nearer, larger metres farther: near is bright either way
    assert disparity[-1, -1] == 255 and disparity[0, 0] == 0
    assert metres[0, 0] == 255 and metres[-1, -1] == 0
    flat = torch.full((4, 4), 3.0)
    assert visualize(flat, flat.min(), flat.max(), DepthKind.METRIC, None).eq(0).all()


def test_colour_maps_are_the_published_tables():
    from depthd.engine.colormaps import lookup_table

    turbo, inferno = lookup_table("turbo"), lookup_table("inferno")
    assert turbo.shape == inferno.shape == (256, 3) and turbo.dtype == np.uint8
    # the ends and the middle of Turbo (Google, 2019) and of matplotlib's inferno, in 8 bits
    assert [tuple(turbo[i]) for i in (0, 128, 255)] == [(48, 18, 59), (164, 252, 60), (122, 4, 3)]
    assert [tuple(inferno[i]) for i in (0, 128, 255)] == [(0, 0, 4), (188, 55, 84), (252, 255, 164)]
    assert lookup_table("gray") is None


def test_requested_output_size(relative):
    frame = Frame(scene(120, 80))
    exact, by_width = relative.estimate([frame, frame], [OutputSpec(width=50, height=40), OutputSpec(width=60)])
    assert exact.depth.shape == (40, 50)
    assert by_width.depth.shape == (40, 60)  # height follows the input's aspect ratio


def test_a_batch_gives_what_single_frames_give(tiny_models):
    engine = DepthEngine.load(ModelSettings("zoe", str(tiny_models["zoedepth"])))
    frames = [Frame(scene(80, 64, seed=1)), Frame(scene(80, 64, seed=2)), Frame(scene(64, 96, seed=3))]
    specs = [OutputSpec(), OutputSpec(width=40, height=32), OutputSpec()]
    batched = engine.estimate(frames, specs)
    assert batched[0].timing.batch_size == 3
    for frame, spec, together in zip(frames, specs, batched):
        alone = engine.estimate([frame], [spec])[0]
        np.testing.assert_allclose(together.depth, alone.depth, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("architecture", ["dpt", "dpt_hybrid", "depth_anything", "zoedepth", "glpn", "depth_pro"])
def test_speed_knobs_keep_the_numbers(tiny_models, architecture):
    frame = Frame(scene(90, 60))
    source = str(tiny_models[architecture])
    expected = DepthEngine.load(ModelSettings("plain", source)).estimate([frame], [OutputSpec()])[0].depth
    for options in ({"attention": "eager", "channels_last": False}, {"attention": "sdpa"}):
        got = DepthEngine.load(ModelSettings("tuned", source, **options)).estimate([frame], [OutputSpec()])[0].depth
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected - expected.mean()) < 1e-4, options


def test_cuda_graphs_are_refused_off_cuda(tiny_models):
    with pytest.raises(ModelLoadError, match="cuda_graphs: needs a CUDA device"):
        DepthEngine.load(ModelSettings("graphs", str(tiny_models["dpt"]), device="cpu", cuda_graphs=True))


def test_pixel_formats_are_converted_on_the_device(relative):
    rgb = scene(64, 48)
    gray = rgb[..., 1].copy()
    as_rgb, as_bgr, as_bgra, as_gray, gray_as_rgb = relative.estimate(
        [
            Frame(rgb),
            Frame(np.ascontiguousarray(rgb[..., ::-1]), PixelFormat.BGR8),
            Frame(np.dstack([rgb[..., ::-1], np.full(rgb.shape[:2], 7, np.uint8)]), PixelFormat.BGRA8),
            Frame(gray, PixelFormat.GRAY8),
            Frame(np.repeat(gray[..., None], 3, axis=2)),
        ],
        [OutputSpec()] * 5,
    )
    np.testing.assert_allclose(as_bgr.depth, as_rgb.depth, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(as_bgra.depth, as_rgb.depth, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(as_gray.depth, gray_as_rgb.depth, rtol=1e-5, atol=1e-6)


def test_depth_pro_without_its_field_of_view_head_is_relative(tiny_models, tmp_path):
    folder = tmp_path / "no-fov"
    shutil.copytree(tiny_models["depth_pro"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["use_fov_model"] = False
    (folder / "config.json").write_text(json.dumps(config))
    result = DepthEngine.load(ModelSettings("pro", str(folder))).estimate([Frame(scene(64, 64))], [OutputSpec()])[0]
    assert result.kind is DepthKind.RELATIVE_DEPTH
    assert result.field_of_view is None


def test_depth_pro_reports_its_field_of_view(tiny_models):
    result = DepthEngine.load(ModelSettings("pro", str(tiny_models["depth_pro"]))).estimate(
        [Frame(scene(200, 100))], [OutputSpec(width=100)]
    )[0]
    assert 40 < result.field_of_view < 70
    assert result.focal_length == pytest.approx(0.5 * 100 / np.tan(np.radians(result.field_of_view) / 2))


# --- load errors ----------------------------------------------------------------------------


def _broken_copy(tiny_models, tmp_path, breakage) -> str:
    folder = tmp_path / "broken"
    shutil.copytree(tiny_models["glpn"], folder)
    breakage(folder)
    return str(folder)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda f: (f / "config.json").unlink(), "the folder has no config.json"),
        (lambda f: (f / "preprocessor_config.json").unlink(), "no preprocessor_config.json"),
        (lambda f: (f / "model.safetensors").unlink(), "no weights file"),
        (lambda f: _truncate(f / "model.safetensors"), "the weights file is corrupt or truncated"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 64), "the weights file is corrupt or truncated"),
    ],
    ids=["no-config", "no-processor", "no-weights", "truncated", "garbage"],
)
def test_broken_checkpoints_say_what_is_wrong(tiny_models, tmp_path, breakage, message):
    folder = _broken_copy(tiny_models, tmp_path, breakage)
    with pytest.raises(ModelLoadError, match=message) as caught:
        DepthEngine.load(ModelSettings("cam", folder))
    assert caught.value.model == "cam" and folder in str(caught.value)


def test_unknown_architecture_is_refused_by_name(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    ViTForImageClassification(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=16, image_size=32)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitecture, match=r"architecture 'vit' is not supported; supported: dpt \(DPT\)"):
        DepthEngine.load(ModelSettings("vit", str(tmp_path)))


def test_a_non_depth_head_of_a_supported_type_is_refused(tiny_models, tmp_path):
    folder = _broken_copy(tiny_models, tmp_path, lambda f: None)
    config = json.loads((tmp_path / "broken" / "config.json").read_text())
    config["architectures"] = ["GLPNForImageClassification"]
    (tmp_path / "broken" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitecture, match="is a GLPNForImageClassification, not a depth-estimation model"):
        DepthEngine.load(ModelSettings("glpn", folder))


@pytest.mark.parametrize("other", ["dpt", "depth_anything"])
def test_weights_of_another_model_are_refused(tiny_models, tmp_path, other):
    copy_weights = lambda f: shutil.copy(tiny_models[other] / "model.safetensors", f)  # noqa: E731
    folder = _broken_copy(tiny_models, tmp_path, copy_weights)
    with pytest.raises(ModelLoadError, match="the weights do not match the config"):
        DepthEngine.load(ModelSettings("glpn", folder))


def test_missing_sources_say_how_to_run_offline():
    with pytest.raises(ModelLoadError, match="no such folder"):
        DepthEngine.load(ModelSettings("cam", "/nonexistent/model"))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=1 with the model already in the Hugging Face cache"):
        DepthEngine.load(ModelSettings("cam", "depthd-tests/no-such-model"))


# --- the pool: load, warm, hand out ---------------------------------------------------------


def test_pool_warms_every_configured_size_before_it_is_ready(tiny_models, caplog):
    pool = ModelPool(Settings(
        models=(ModelSettings("small", str(tiny_models["glpn"]), warmup_sizes=((48, 64), (96, 128))),
                ModelSettings("zoe", str(tiny_models["zoedepth"]), warmup_sizes=((48, 64),))),
        default_model="zoe",
    ))
    with pytest.raises(Unavailable, match="still loading"):
        pool.engine("small")
    progress = []
    with caplog.at_level(logging.INFO, logger="depthd"):
        pool.load(lambda name, i, n: progress.append((name, i, n)))
    assert progress == [("small", 1, 2), ("zoe", 2, 2)]
    warmed = [r.getMessage().split(" ms=")[0] for r in caplog.records if r.getMessage().startswith("warmed")]
    assert warmed == [
        "warmed model=small size=64x48 batch=1",
        "warmed model=small size=128x96 batch=1",
        "warmed model=zoe size=64x48 batch=1",
    ]
    assert pool.ready and pool.engine("").name == "zoe"
    with pytest.raises(NotFound, match="model 'nope' is not served; served: small, zoe"):
        pool.engine("nope")


def test_a_compiled_model_is_warmed_at_every_batch_size_it_may_run(tiny_models, monkeypatch):
    warmed = []
    monkeypatch.setattr(DepthEngine, "warmup", lambda self, sizes, batch=1: warmed.append((sizes, batch)))
    sizes = ((48, 64),)
    compiled = ModelSettings("compiled", str(tiny_models["glpn"]), compile=True, warmup_sizes=sizes, max_batch=3)
    plain = ModelSettings("plain", str(tiny_models["glpn"]), warmup_sizes=sizes, max_batch=3)
    pool = ModelPool(Settings(models=(compiled, plain)))
    pool.load()
    pool.close()
    assert warmed == [(sizes, 1), (sizes, 2), (sizes, 3), (sizes, 1)]


def test_a_hub_id_loads_offline_from_a_prefilled_cache(tiny_models, tmp_path):
    """HF_HUB_OFFLINE=1 and a cache laid out as huggingface_hub lays it out: the hub id resolves with no network."""
    import os
    import subprocess
    import sys

    revision = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--depthd-tests--tiny-glpn"
    shutil.copytree(tiny_models["glpn"], repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    code = (
        "from depthd.config import ModelSettings\n"
        "from depthd.engine.engine import DepthEngine\n"
        "engine = DepthEngine.load(ModelSettings('cam', 'depthd-tests/tiny-glpn'))\n"
        "print(engine.checkpoint.architecture.model_type, engine.kind.value)\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["glpn", "metric"]
