"""Shared fixtures: tiny random checkpoints of every architecture, built once per session, offline.

Tests marked `slow` (seconds and gigabytes), `gpu` (a CUDA device) or `systemd` (root, boots a
container) are opt-in: `pytest --run-slow`, `--run-gpu` where torch sees a GPU, and `--run-systemd`.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from depthd.engine import synthetic  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """name -> folder of a saved tiny checkpoint (model + preprocessor config), for every architecture."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {name: synthetic.build(name, root / name) for name in synthetic.TINY}


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
