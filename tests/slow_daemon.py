"""`depthd` run as systemd runs it, with a test-only model behaviour, to watch supervision at work.

Frames 99 pixels wide hang the forward pass for good (a stuck GPU, say); frames 98
pixels wide take 0.3 s each; frames 97 pixels wide keep torch computing for 30 s (a
forward pass far longer than the drain's grace, inside torch's own threads).
Everything else is the real daemon: `python slow_daemon.py serve ...`.
"""

import sys
import threading
import time

import torch

from depthd.engine import engine

HANG_WIDTH, SLOW_WIDTH, BUSY_WIDTH = 99, 98, 97
_infer = engine.DepthEngine.infer
_never = threading.Event()


def infer(self, prepared, specs, *args, **kwargs):
    widths = [item.input_size[1] for item in prepared]
    if HANG_WIDTH in widths:
        _never.wait()
    if BUSY_WIDTH in widths:
        a = torch.randn(1500, 1500)
        until = time.monotonic() + 30
        while time.monotonic() < until:
            a = torch.tanh(a @ a)
    time.sleep(0.3 * widths.count(SLOW_WIDTH))
    return _infer(self, prepared, specs, *args, **kwargs)


if __name__ == "__main__":
    from depthd.ops.cli import main

    engine.DepthEngine.infer = infer  # only in the daemon this script runs, never in a test process importing it
    sys.exit(main(sys.argv[1:]))
