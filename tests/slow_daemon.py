"""`depthd` run as systemd runs it, with a test-only model behaviour, to watch supervision at work.

Frames 99 pixels wide hang the forward pass for good (a stuck GPU, say); frames 98
pixels wide take 0.3 s each. Everything else is the real daemon: `python slow_daemon.py serve ...`.
"""

import sys
import threading
import time

from depthd import engine

HANG_WIDTH, SLOW_WIDTH = 99, 98
_infer = engine.DepthEngine.infer
_never = threading.Event()


def infer(self, prepared, specs):
    widths = [item.input_size[1] for item in prepared]
    if HANG_WIDTH in widths:
        _never.wait()
    time.sleep(0.3 * widths.count(SLOW_WIDTH))
    return _infer(self, prepared, specs)


engine.DepthEngine.infer = infer

if __name__ == "__main__":
    from depthd.cli import main

    sys.exit(main(sys.argv[1:]))
