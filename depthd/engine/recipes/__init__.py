"""The registry of architectures depthd runs, each with its recipe (one module per family).

A checkpoint's `config.json` names its `model_type`; only the types registered here are
run. A new architecture of a known family is one entry in its family's ARCHITECTURES; a
new family is one module beside these and one line below.
"""

from __future__ import annotations

from depthd.engine.recipes import depth_pro, dpt, glpn, zoedepth
from depthd.engine.recipes.base import Architecture, Recipe

ARCHITECTURES: dict[str, Architecture] = {
    architecture.model_type: architecture
    for family in (dpt, zoedepth, glpn, depth_pro)
    for architecture in family.ARCHITECTURES
}


def supported_names() -> str:
    return ", ".join(f"{a.model_type} ({a.label})" for a in ARCHITECTURES.values())


__all__ = ["ARCHITECTURES", "Architecture", "Recipe", "supported_names"]
