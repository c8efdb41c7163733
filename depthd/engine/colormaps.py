"""The colour maps of the depth visualization, as 256x3 uint8 lookup tables.

Each table ships as data (`data/<name>.rgb`, 768 bytes: 256 RGB triples): the published
256-entry tables (Turbo, Google 2019; inferno, matplotlib's perceptually uniform map),
each value rounded to 8 bits. No plotting library is needed.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np

NAMES = ("gray", "turbo", "inferno")


@lru_cache(maxsize=None)
def lookup_table(name: str) -> np.ndarray | None:
    """The (256, 3) uint8 table of a colour map, or None for "gray" (the 8-bit map as it is)."""
    if name == "gray":
        return None
    if name not in NAMES:
        raise KeyError(f"unknown colour map {name!r}; known: {', '.join(NAMES)}")
    data = resources.files("depthd.engine").joinpath("data", f"{name}.rgb").read_bytes()
    table = np.frombuffer(data, dtype=np.uint8).reshape(256, 3)
    table.setflags(write=False)
    return table
