"""Backends: OpenVINO and ONNX Runtime run the exported network and match eager torch; exports are
cached on disk; `auto` picks by the CPU, read through the one seam that reads it; input_size trades
accuracy for speed openly, and ListModels says what each model runs on."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from daemon import DaemonThread

from depthd.config import ModelSettings, Settings
from depthd.domain import Frame, OutputSpec
from depthd.engine import backends, hardware
from depthd.engine.backends import export
from depthd.engine.engine import DepthEngine
from depthd.errors import ModelLoadError
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
    monkeypatch.setattr(backends, "candidates", lambda spec, device: [spec] if spec not in (None, "auto")
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
