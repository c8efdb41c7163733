"""What depthctl shows while frames go through the daemon: a progress bar on a terminal, and a summary
whose fps counts only real results (depth maps), with dropped and failed frames reported apart."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from depthd_client.messages import DepthResult


def bar(done: int, total: int, width: int = 30) -> str:
    """`[#####.....] done/total`."""
    filled = int(width * min(done, total) / total) if total else 0
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


@dataclass
class Tally:
    """Results counted as they come: `depth` are real results, `dropped` frames the daemon skipped for a
    newer one (latest-frame-wins), `failed` frames it answered with an error."""

    total: int | None = None
    frames: int = 0
    depth: int = 0
    dropped: int = 0
    failed: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def add(self, result: DepthResult) -> None:
        self.frames += 1
        if result.error is not None:
            self.failed += 1
        elif result.dropped:
            self.dropped += 1
        else:
            self.depth += 1
            if result.timing is not None:
                self.latencies_ms.append(result.timing.total_ms)

    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    def summary(self) -> str:
        latencies = sorted(self.latencies_ms)
        p50 = f", p50 {latencies[len(latencies) // 2]:.1f} ms in the daemon" if latencies else ""
        return (f"{self.frames} frames in {self.elapsed():.2f} s: {self.depth} depth maps "
                f"({self.depth / self.elapsed():.1f} fps){p50}, {self.dropped} dropped, {self.failed} failed")

    def show(self, out: TextIO | None = None) -> None:
        """One line of progress, redrawn in place, when `out` (stderr) is a terminal."""
        out = out or sys.stderr
        if not out.isatty():
            return
        done = bar(self.frames, self.total) if self.total else f"{self.frames} frames"
        out.write(f"\r{done} {self.depth / self.elapsed():.1f} fps, {self.dropped} dropped, {self.failed} failed")
        out.flush()

    def done(self, out: TextIO | None = None) -> None:
        """The summary line, after the progress line where there was one."""
        out = out or sys.stderr
        if out.isatty() and self.frames:
            out.write("\n")
        out.write(self.summary() + "\n")
        out.flush()
