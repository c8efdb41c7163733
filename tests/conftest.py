"""Shared fixtures: tiny random checkpoints of every architecture, built once per session, offline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from depthd import synthetic  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """name -> folder of a saved tiny checkpoint (model + preprocessor config), for every architecture."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {name: synthetic.build(name, root / name) for name in synthetic.TINY}
