"""Backends: OpenVINO and ONNX Runtime run the exported network and match eager torch; exports are
cached on disk and the weights loaded for one are let go; `auto` picks by the CPU and, on CUDA, by
ONNX Runtime's providers, each read through the one seam that reads it (faked here: no GPU is
needed); input_size trades accuracy for speed openly, and ListModels says what each model runs on."""

from __future__ import annotations

import importlib.util
import logging
import weakref

import numpy as np
import pytest
import torch
from daemon import DaemonThread

from depthd.config import ModelSettings, Settings
from depthd.domain import Frame, OutputSpec
from depthd.engine import backends, hardware
from depthd.engine.backends import export, runtimes
from depthd.engine.backends.runtimes import CPU, CUDA, TENSORRT
from depthd.engine.engine import DepthEngine
from depthd.errors import InvalidArgument, ModelLoadError
from depthd_client import DepthClient

pytestmark = pytest.mark.any_machine

EXPORTED = [name for name in ("openvino", "onnxruntime") if backends.installed(name)]
SIZE = ((48, 64),)


def frames() -> list[Frame]:
    rng = np.random.default_rng(3)
    return [Frame(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(2)]


def centred(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref - ref.mean()))


def depth_of(engine: DepthEngine) -> np.ndarray:
    return np.stack([r.depth for r in engine.estimate(frames(), [OutputSpec()] * 2)])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("compiled")


@pytest.mark.skipif(not EXPORTED, reason="no exported backend installed: pip install 'depthd[openvino,onnxruntime]'")
@pytest.mark.parametrize("backend", EXPORTED)
def test_every_architecture_runs_on_the_backend_as_in_eager_torch(tiny_models, cache, backend):
    for name, folder in tiny_models.items():
        settings = ModelSettings(name, str(folder), dtype="float32", warmup_sizes=SIZE, cache_dir=str(cache))
        eager = DepthEngine.load(ModelSettings(name, str(folder), dtype="float32", backend="torch", warmup_sizes=SIZE))
        exported = DepthEngine.load(ModelSettings(**{**vars(settings), "backend": backend}))
        assert (exported.backend, exported.dtype) == (backend, torch.float32)
        assert exported.checkpoint.model is None, "no torch weights held beside the backend's"
        error = centred(depth_of(exported), depth_of(eager))
        assert error < 1e-3, f"{name} on {backend}: centred error {error:.2e}"


@pytest.mark.skipif(not EXPORTED, reason="no exported backend installed")
def test_a_second_load_finds_the_export_on_disk_and_loads_no_weights(tiny_models, tmp_path, caplog):
    settings = ModelSettings("da", str(tiny_models["depth_anything"]), backend=EXPORTED[0], warmup_sizes=SIZE,
                             cache_dir=str(tmp_path))
    first = DepthEngine.load(settings)
    assert (first._model.exports.exported, first._model.exports.found) == (1, 0)
    caplog.set_level(logging.INFO, logger="depthd.engine.backends.export")
    second = DepthEngine.load(settings)
    assert (second._model.exports.exported, second._model.exports.found) == (0, 1)
    assert "export found model=da size=518x392" in caplog.text
    np.testing.assert_allclose(depth_of(second), depth_of(first), rtol=1e-5, atol=1e-6)
    # a new processed size is exported when first seen, and kept too
    frame = Frame(np.zeros((60, 64, 3), np.uint8))
    second.estimate([frame], [OutputSpec()])
    assert second._model.exports.exported == 1
    assert len(list(tmp_path.rglob("*.onnx"))) == 2


def test_auto_precision_follows_the_cpu_flags(tiny_models, monkeypatch):
    settings = ModelSettings("da", str(tiny_models["depth_anything"]), backend="torch", warmup_sizes=SIZE)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    assert DepthEngine.load(settings).dtype == torch.float32, "no bfloat16 in hardware: emulated, slower"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    engine = DepthEngine.load(settings)
    assert engine.dtype == torch.bfloat16
    assert next(engine.checkpoint.model.parameters()).dtype == torch.bfloat16
    exact = DepthEngine.load(ModelSettings(**{**vars(settings), "dtype": "float32"}))
    assert exact.dtype == torch.float32, "dtype: float32 is exact float32 on any CPU"
    assert backends.precision("auto", torch.device("cpu"), "onnxruntime") == torch.float32
    assert backends.precision("auto", torch.device("cuda"), "torch") == torch.float16


def test_auto_backend_rule(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(hardware, "is_x86", lambda: True)
    monkeypatch.setattr(backends, "installed", lambda name: name in ("torch", "openvino", "onnxruntime"))
    assert backends.candidates("auto", cpu) == ["openvino", "torch"]
    assert backends.candidates("auto", cuda) == ["torch"]
    monkeypatch.setattr(backends, "installed", lambda name: name in ("torch", "onnxruntime"))
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    assert backends.candidates("auto", cpu) == ["onnxruntime", "torch"]
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert backends.candidates("auto", cpu) == ["torch"], "torch's bfloat16 beat ONNX Runtime's float32"
    monkeypatch.setattr(hardware, "is_x86", lambda: False)
    assert backends.candidates("auto", cpu) == ["torch"]


def test_auto_backend_rule_on_cuda_is_onnxruntime_only_with_tensorrt(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(backends, "installed", lambda name: name in ("torch", "onnxruntime"))
    monkeypatch.setattr(runtimes, "available_providers", lambda: (TENSORRT, CUDA, CPU))
    assert backends.candidates("auto", cuda) == ["onnxruntime", "torch"], "TensorRT through ONNX Runtime"
    assert backends.precision("auto", cuda, "onnxruntime") == torch.float16, "TensorRT's fp16 mode"
    monkeypatch.setattr(runtimes, "available_providers", lambda: (CUDA, CPU))
    assert backends.candidates("auto", cuda) == ["torch"], "ONNX Runtime's CUDA provider alone: torch"
    assert backends.candidates("onnxruntime", cuda) == ["onnxruntime"], "asked for, it runs on CUDA's provider"
    assert backends.precision("auto", cuda, "onnxruntime") == torch.float32, "no fp16 without TensorRT"
    with pytest.raises(InvalidArgument, match="dtype: float16 is not available with backend onnxruntime on cuda"):
        backends.precision("float16", cuda, "onnxruntime")
    monkeypatch.setattr(backends, "installed", lambda name: name == "torch")
    monkeypatch.setattr(runtimes, "available_providers", lambda: (TENSORRT, CUDA, CPU))
    assert backends.candidates("auto", cuda) == ["torch"], "providers of an onnxruntime that is not installed"


def test_onnxruntime_on_cuda_without_a_gpu_provider_names_the_gpu_extra(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(backends, "installed", lambda name: name in ("torch", "onnxruntime", "openvino"))
    monkeypatch.setattr(runtimes, "available_providers", lambda: (CPU,))
    with pytest.raises(InvalidArgument, match=r"has neither \(it has CPUExecutionProvider\).*'depthd\[onnxruntime-gpu\]'"):
        backends.candidates("onnxruntime", cuda)
    with pytest.raises(InvalidArgument, match="backend: openvino runs on cpu in depthd; the model is on cuda:0"):
        backends.candidates("openvino", cuda)
    monkeypatch.setattr(backends, "installed", lambda name: name == "torch")
    with pytest.raises(InvalidArgument, match=r"pip install 'depthd\[onnxruntime-gpu\]'"):
        backends.candidates("onnxruntime", cuda)
    with pytest.raises(InvalidArgument, match=r"pip install 'depthd\[onnxruntime\]'"):
        backends.candidates("onnxruntime", torch.device("cpu"))


def test_onnxruntime_providers_for_the_device(tmp_path):
    cuda = torch.device("cuda", 1)
    everything = [TENSORRT, CUDA, CPU]
    providers = runtimes.providers_for(cuda, torch.float16, everything, tmp_path)
    assert [name for name, _ in providers] == [TENSORRT, CUDA, CPU]
    trt = providers[0][1]
    assert trt["device_id"] == 1 and trt["trt_fp16_enable"] is True
    assert trt["trt_engine_cache_enable"] is True and trt["trt_timing_cache_enable"] is True
    assert trt["trt_engine_cache_path"] == str(tmp_path / "tensorrt" / "fp16")
    assert trt["trt_timing_cache_path"] == str(tmp_path / "tensorrt")
    assert providers[1] == (CUDA, {"device_id": 1})
    exact = runtimes.providers_for(cuda, torch.float32, everything, tmp_path)[0][1]
    assert exact["trt_fp16_enable"] is False, "an engine is built for one precision: its own folder"
    assert exact["trt_engine_cache_path"] == str(tmp_path / "tensorrt" / "fp32")
    assert runtimes.providers_for(cuda, torch.float32, [CUDA, CPU], tmp_path) == [(CUDA, {"device_id": 1}), (CPU, {})]
    with pytest.raises(InvalidArgument, match="float16 .* is TensorRT's fp16 mode"):
        runtimes.providers_for(cuda, torch.float16, [CUDA, CPU], tmp_path)
    with pytest.raises(InvalidArgument, match="dtype: bfloat16 is not available with backend onnxruntime on cuda:1"):
        runtimes.providers_for(cuda, torch.bfloat16, everything, tmp_path)
    with pytest.raises(InvalidArgument, match=r"has neither \(it has none\).*pip install 'depthd\[onnxruntime-gpu\]'"):
        runtimes.providers_for(cuda, torch.float32, [], tmp_path)
    assert runtimes.providers_for(torch.device("cpu"), torch.float32, everything, tmp_path) == [(CPU, {})]


@pytest.mark.skipif(not backends.installed("onnxruntime"), reason="onnxruntime not installed")
@pytest.mark.filterwarnings("ignore:Specified provider", "ignore::DeprecationWarning")
def test_a_gpu_provider_that_does_not_load_is_refused_not_run_on_the_cpu(tmp_path, monkeypatch):
    """onnxruntime lists providers it was built with, and a session whose provider does not load runs
    on the next: this CPU onnxruntime, told it has TensorRT and CUDA, must not quietly run on the CPU."""
    onnx = tmp_path / "conv.onnx"
    with torch.no_grad():
        torch.onnx.export(torch.nn.Conv2d(3, 1, 1), (torch.zeros(1, 3, 4, 4),), str(onnx), dynamo=False,
                          input_names=["pixel_values"])
    monkeypatch.setattr(runtimes, "available_providers", lambda: (TENSORRT, CUDA, CPU))
    runtime = runtimes.OnnxRuntimeRuntime(torch.float16, 1, tmp_path, torch.device("cuda", 0))
    assert (tmp_path / "tensorrt" / "fp16").is_dir()
    with pytest.raises(export.ExportFailed, match="could not start its TensorrtExecutionProvider"):
        runtime.compile(onnx)
    cpu = runtimes.OnnxRuntimeRuntime(torch.float32, 1, tmp_path, torch.device("cpu"))
    assert cpu.compile(onnx)(np.zeros((1, 3, 4, 4), np.float32))[0].shape == (1, 1, 4, 4)


@pytest.mark.gpu
def test_onnxruntime_on_cuda_runs_as_eager_torch(tiny_models, tmp_path):
    """Opt-in (--run-gpu), with onnxruntime-gpu; never run by the sessions that wrote it (no GPU).
    The bounds allow for TF32, which both torch's convolutions and TensorRT may use in float32."""
    available = runtimes.available_providers()
    if not {TENSORRT, CUDA} & set(available):
        pytest.skip("no GPU provider in this onnxruntime: pip install 'depthd[onnxruntime-gpu]'")
    folder = str(tiny_models["depth_anything"])
    eager = DepthEngine.load(ModelSettings("e", folder, device="cuda", backend="torch", dtype="float32", warmup_sizes=SIZE))
    for dtype, bound in (("float32", 5e-3), ("float16", 3e-2)):
        if dtype == "float16" and TENSORRT not in available:
            continue
        engine = DepthEngine.load(ModelSettings("o", folder, device="cuda", backend="onnxruntime", dtype=dtype,
                                                warmup_sizes=SIZE, cache_dir=str(tmp_path)))
        assert (engine.backend, engine.dtype) == ("onnxruntime", getattr(torch, dtype))
        error = centred(depth_of(engine), depth_of(eager))
        assert error < bound, f"onnxruntime {dtype} on CUDA: centred error {error:.2e}"
    if TENSORRT in available:
        assert list((tmp_path / "tensorrt").rglob("*.engine")), "TensorRT's engines are cached"


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="onnx not installed: torch.onnx.export needs it")
def test_an_export_drops_the_torch_weights_and_trims_the_heap(tiny_models, tmp_path, monkeypatch):
    from transformers import AutoModelForDepthEstimation

    loaded, trims = [], []
    monkeypatch.setattr(export, "_malloc_trim", lambda: trims.append)

    def load():
        model = AutoModelForDepthEstimation.from_pretrained(tiny_models["depth_anything"])
        loaded.append(weakref.ref(model))
        return model

    exports = export.OnnxExports("da", tmp_path, {"test": "1"}, load, field_of_view=False)
    exports.path_for((42, 56))
    assert loaded and loaded[0]() is None, "the torch model is gone once the file is written"
    assert trims == [0], "malloc_trim(0) after the export"
    exports.path_for((42, 56))
    assert trims == [0], "a file found on disk loads nothing, so trims nothing"


def test_malloc_trim_is_only_called_where_libc_has_it(monkeypatch):
    export._malloc_trim.cache_clear()
    try:
        monkeypatch.setattr(export.ctypes, "CDLL", lambda name: object())
        assert export._malloc_trim() is None
        export.release_freed_memory()  # no error where there is none
    finally:
        monkeypatch.undo()
        export._malloc_trim.cache_clear()


def test_auto_backend_takes_one_that_has_the_dtype_asked_for(tiny_models, monkeypatch):
    monkeypatch.setattr(hardware, "is_x86", lambda: True)
    monkeypatch.setattr(backends, "installed", lambda name: name in ("torch", "openvino"))
    engine = DepthEngine.load(ModelSettings("da", str(tiny_models["depth_anything"]), dtype="float16", warmup_sizes=SIZE))
    assert (engine.backend, engine.dtype) == ("torch", torch.float16), "OpenVINO has no float16 in depthd: torch has"


def test_a_backend_not_installed_names_its_extra(tiny_models, monkeypatch):
    monkeypatch.setattr(backends, "installed", lambda name: name == "torch")
    with pytest.raises(ModelLoadError, match=r"backend: openvino is not installed: pip install 'depthd\[openvino\]'"):
        DepthEngine.load(ModelSettings("da", str(tiny_models["depth_anything"]), backend="openvino"))
    monkeypatch.setattr(backends, "installed", lambda name: True)
    with pytest.raises(ModelLoadError, match="dtype: bfloat16 is not available with backend onnxruntime"):
        DepthEngine.load(ModelSettings("da", str(tiny_models["depth_anything"]), backend="onnxruntime", dtype="bfloat16"))


@pytest.mark.skipif(not EXPORTED, reason="no exported backend installed")
def test_a_network_that_does_not_export_falls_back_to_torch_under_auto(tiny_models, tmp_path, monkeypatch, caplog):
    def refuse(self, path, size):
        raise export.ExportFailed("torch.onnx.export failed: an operator it does not know")

    monkeypatch.setattr(export.OnnxExports, "_export", refuse)
    monkeypatch.setattr(backends, "candidates", lambda spec, device, dtype=None: [spec] if spec not in (None, "auto")
                        else [EXPORTED[0], "torch"])
    folder = str(tiny_models["glpn"])
    engine = DepthEngine.load(ModelSettings("g", folder, warmup_sizes=SIZE, cache_dir=str(tmp_path)))
    assert engine.backend == "torch"
    assert f"backend={EXPORTED[0]} cannot run it" in caplog.text
    with pytest.raises(ModelLoadError, match="an operator it does not know; backend torch runs every architecture"):
        DepthEngine.load(ModelSettings("g", folder, backend=EXPORTED[0], warmup_sizes=SIZE, cache_dir=str(tmp_path)))


def test_input_size_is_the_processed_short_side_and_listmodels_says_it(tiny_models, tmp_path):
    da = str(tiny_models["depth_anything"])
    settings = Settings(
        listen=("127.0.0.1:0",),
        models=(ModelSettings("fast", da, input_size=266, warmup_sizes=((480, 640),), cache_dir=str(tmp_path)),
                ModelSettings("own", da, backend="torch", dtype="float32", warmup_sizes=SIZE),
                ModelSettings("glpn", str(tiny_models["glpn"]), backend="torch", warmup_sizes=SIZE)),
    )
    running = DaemonThread(settings)
    try:
        with DepthClient(running.address) as client:
            client.wait_until_serving(120)
            models = {m.name: m for m in client.models()}
            assert (models["fast"].input_size, models["own"].input_size, models["glpn"].input_size) == (266, 518, 0)
            assert models["own"].backend == "torch" and models["own"].dtype == "float32"
            assert models["fast"].backend == backends.candidates("auto", torch.device("cpu"))[0]
            assert running.daemon.pool.engine("fast").processed_size(480, 640) == (266, 350)
            result = client.estimate(np.zeros((480, 640, 3), np.uint8), model="fast")
            assert result.depth.shape == (480, 640)
    finally:
        assert running.stop() == 0
    with pytest.raises(ModelLoadError, match="input_size: GLPN processes frames at their own size"):
        DepthEngine.load(ModelSettings("glpn", str(tiny_models["glpn"]), input_size=320))
