"""Smooth synthetic scenes for tests: what a camera sees, not white noise."""

from __future__ import annotations

import numpy as np


def scene(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth synthetic RGB scene: a floor, a wall and a few soft blobs, like a camera would see."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    y /= height
    x /= width
    floor = np.clip((y - 0.55) * 2.2, 0, 1)
    image = np.stack([0.35 + 0.3 * floor + 0.15 * x, 0.4 + 0.2 * np.sin(3 * x + 1), 0.55 - 0.3 * floor], -1)
    for _ in range(4):
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.85), rng.uniform(0.06, 0.18)
        blob = np.exp(-(((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r)))
        image += blob[..., None] * (rng.uniform(-0.3, 0.3, 3))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)
