"""The warm model pool: loads every configured model, warms it, and hands out engines by name.

This is the only place that will own threads and queues (the batcher comes with the
daemon); for now it loads, warms and answers which models are ready.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from depthd.engine import DEFAULT_WARMUP_SIZES, DepthEngine, EngineOptions
from depthd.errors import NotFound, Unavailable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve: a name clients use, where to load it from, and how to run it."""

    name: str
    source: str
    options: EngineOptions = field(default_factory=EngineOptions)
    warmup_sizes: tuple[tuple[int, int], ...] = DEFAULT_WARMUP_SIZES
    """(height, width) sizes to run once before the model is ready."""


Progress = Callable[[str, int, int], None]


class ModelPool:
    def __init__(self, specs: list[ModelSpec], default: str | None = None):
        if not specs:
            raise ValueError("a pool needs at least one model")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if default is not None and default not in names:
            raise ValueError(f"default model {default!r} is not among {names}")
        self.specs = list(specs)
        self.default = default or names[0]
        self._engines: dict[str, DepthEngine] = {}

    def load(self, progress: Progress | None = None) -> None:
        """Load and warm every model in order; raises ModelLoadError on the first that fails."""
        total = len(self.specs)
        for position, spec in enumerate(self.specs, start=1):
            if progress:
                progress(spec.name, position, total)
            engine = DepthEngine.load(spec.name, spec.source, spec.options)
            engine.warmup(spec.warmup_sizes)
            self._engines[spec.name] = engine
            logger.info("ready model=%s (%d/%d)", spec.name, position, total)

    @property
    def ready(self) -> bool:
        return len(self._engines) == len(self.specs)

    def is_ready(self, name: str) -> bool:
        return name in self._engines

    def engine(self, name: str = "") -> DepthEngine:
        """The engine serving `name` ("" for the default model)."""
        name = name or self.default
        if name in self._engines:
            return self._engines[name]
        if any(s.name == name for s in self.specs):
            raise Unavailable(f"model {name!r} is still loading")
        raise NotFound(f"model {name!r} is not served; served: {', '.join(s.name for s in self.specs)}")
