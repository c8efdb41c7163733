"""Shared fixtures: tiny random checkpoints of every architecture, built once per session, offline.

Tests marked `slow` (seconds and gigabytes), `gpu` (a CUDA device) or `systemd` (root, boots a
container) are opt-in: `pytest --run-slow`, `--run-gpu` where torch sees a GPU, and `--run-systemd`.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Daemons the tests start as processes run the reference path too (see `reference_path` below).
os.environ.setdefault("DEPTHD_BACKEND", "torch")
os.environ.setdefault("DEPTHD_DTYPE", "float32")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from depthd.engine import backends, hardware, synthetic  # noqa: E402
from depthd.engine.backends import runtimes  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """name -> folder of a saved tiny checkpoint (model + preprocessor config), for every architecture."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {name: synthetic.build(name, root / name) for name in synthetic.TINY}


MACHINE = {"cpu_flags": hardware.cpu_flags, "installed": backends.installed,
           "available_providers": runtimes.available_providers}


@pytest.fixture(scope="session", autouse=True)
def reference_path():
    """What `auto` picks depends on the machine: its CPU (bfloat16 where it has AMX or AVX-512-BF16),
    the backends installed and, on CUDA, ONNX Runtime's providers (TensorRT). A test's numbers must
    not, so the suite sees a machine without any (torch, float32), through the seams that read them;
    tests marked `any_machine` see it as it is."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hardware, "cpu_flags", lambda: frozenset())
        patch.setattr(backends, "installed", lambda name: name == "torch")
        patch.setattr(runtimes, "available_providers", lambda: ())
        yield


@pytest.fixture(autouse=True)
def any_machine(request, monkeypatch):
    if request.node.get_closest_marker("any_machine") is not None:
        monkeypatch.setattr(hardware, "cpu_flags", MACHINE["cpu_flags"])
        monkeypatch.setattr(backends, "installed", MACHINE["installed"])
        monkeypatch.setattr(runtimes, "available_providers", MACHINE["available_providers"])


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow")
    parser.addoption("--run-gpu", action="store_true", help="also run the tests marked gpu (needs CUDA)")
    parser.addoption("--run-systemd", action="store_true",
                     help="also run the tests marked systemd (root: boots systemd in a systemd-nspawn container)")


def pytest_collection_modifyitems(config, items):
    for marker, option in (("slow", "--run-slow"), ("gpu", "--run-gpu"), ("systemd", "--run-systemd")):
        if config.getoption(option):
            continue
        skip = pytest.mark.skip(reason=f"{marker}: opt-in with {option}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
