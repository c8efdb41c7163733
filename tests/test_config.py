"""Settings: file < environment < flags, validated with errors that name the key and its origin."""

from __future__ import annotations

import pytest

from depthd.config import ConfigError, load_settings, model_from_argument
from depthd.ops.cli import main as depthd_main

CONFIG = """\
listen: ["127.0.0.1:6000", "unix:/run/depthd/depthd.sock"]
device: cpu
dtype: float32
models:
  - name: small
    source: depth-anything/Depth-Anything-V2-Small-hf
    device: cuda:1
    warmup_sizes: [[480, 640], [720, 1280]]
    max_batch: 8
  - name: zoe
    source: Intel/zoedepth-nyu-kitti
default_model: zoe
limits:
  max_input_pixels: 2000000
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "depthd.yaml"
    path.write_text(CONFIG)
    return path


def test_file_then_environment_then_flags(config_file):
    from_file = load_settings(config_file, {}, {})
    assert from_file.listen == ("127.0.0.1:6000", "unix:/run/depthd/depthd.sock")
    assert [m.name for m in from_file.models] == ["small", "zoe"] and from_file.default == "zoe"
    assert from_file.resolved(from_file.models[0]).device == "cuda:1"  # a model's own device wins over the file's
    assert from_file.models[0].warmup_sizes == ((480, 640), (720, 1280))
    assert from_file.limits.max_input_pixels == 2_000_000 and from_file.limits.stream_window == 4

    environment = {"DEPTHD_DEVICE": "cuda:0", "DEPTHD_MAX_INPUT_PIXELS": "3000000", "DEPTHD_LOG_LEVEL": "debug"}
    with_env = load_settings(config_file, environment, {})
    assert with_env.resolved(with_env.models[0]).device == "cuda:0"  # start-up device overrides every model's
    assert with_env.limits.max_input_pixels == 3_000_000 and with_env.log_level == "debug"

    flags = {"device": "cpu", "models": [model_from_argument("cam=/models/cam")], "listen": ["0.0.0.0:7000"],
             "allow_insecure_remote": True}
    with_flags = load_settings(config_file, environment, flags)
    assert with_flags.device == "cpu" and with_flags.listen == ("0.0.0.0:7000",)
    assert [(m.name, m.source) for m in with_flags.models] == [("cam", "/models/cam")]


def test_a_bare_source_names_itself():
    assert model_from_argument("depth-anything/Depth-Anything-V2-Small-hf") == {
        "name": "depth-anything-v2-small-hf", "source": "depth-anything/Depth-Anything-V2-Small-hf"}
    assert model_from_argument("cam=/srv/models/x") == {"name": "cam", "source": "/srv/models/x"}


@pytest.mark.parametrize(
    "text, environment, message",
    [
        ("models: [{name: a, source: b, max_batch: 0}]", {},
         r"models\[0\]\.max_batch \(from .*\): must be a whole number from 1 to 256, got 0"),
        ("models: [{name: a, source: b, devcie: cpu}]", {}, r"models\[0\]\.devcie .*: unknown setting; known: .*device, dtype"),
        ("models: [{name: a}]", {}, r"models\[0\]\.source .*: is required"),
        ("models: [{name: a, source: b}, {name: a, source: c}]", {}, "names must be unique; repeated: a"),
        ("listen: [localhost]\nmodels: [{name: a, source: b}]", {}, r"listen\[0\] .*: must be host:port"),
        ("models: [{name: a, source: b}]", {"DEPTHD_DTYPE": "int8"}, r"dtype \(from environment\): must be one of auto"),
        ("models: [{name: a, source: b}]", {"DEPTHD_STREAM_WINDOW": "lots"}, r"limits\.stream_window \(from environment\)"),
        ("models: []", {}, r"models .*: at least one model is needed"),
        ("[1, 2]", {}, "the top level must be a mapping"),
    ],
)
def test_errors_name_the_key(tmp_path, text, environment, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(path, environment, {})


def test_check_config_validates_without_loading(config_file, tmp_path, capsys):
    assert depthd_main(["check-config", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "model zoe (default): Intel/zoedepth-nyu-kitti" in out

    missing = tmp_path / "missing.yaml"
    missing.write_text("models: [{name: a, source: /nonexistent/model}]\n")
    assert depthd_main(["check-config", str(missing)]) == 2
    assert "models[0].source: no such folder '/nonexistent/model'" in capsys.readouterr().err


def test_the_example_config_is_valid_and_names_every_setting():
    from dataclasses import fields
    from pathlib import Path

    from depthd.config import Limits, ModelSettings, Settings

    example = Path(__file__).resolve().parent.parent / "systemd" / "depthd.yaml"
    settings = load_settings(example, {}, {})
    assert settings.models[0].source == "depth-anything/Depth-Anything-V2-Small-hf"
    text = example.read_text()
    documented = [f.name for cls in (Settings, Limits, ModelSettings) for f in fields(cls) if f.name != "demo" or cls is Settings]
    assert [name for name in documented if f"{name}:" not in text] == []
