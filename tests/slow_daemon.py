"""`depthd` run as systemd runs it, with a test-only model behaviour, to watch supervision at work.

Frames 99 pixels wide hang the forward pass for good (a stuck GPU, say); frames 98
pixels wide take 0.3 s each. Everything else is the real daemon: `python slow_daemon.py serve ...`.
"""

import sys
import threading
import time

from depthd import engine

HANG_WIDTH, SLOW_WIDTH = 99, 98
_estimate = engine.DepthEngine.estimate
_never = threading.Event()


def estimate(self, frames, specs):
    widths = [frame.width for frame in frames]
    if HANG_WIDTH in widths:
        _never.wait()
    time.sleep(0.3 * widths.count(SLOW_WIDTH))
    return _estimate(self, frames, specs)


engine.DepthEngine.estimate = estimate

if __name__ == "__main__":
    from depthd.cli import main

    sys.exit(main(sys.argv[1:]))
