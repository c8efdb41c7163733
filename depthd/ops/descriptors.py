"""File descriptors: take the hard limit at start, and say so in the log before they run out.

Every connection is a file descriptor. Most systems give a process a soft limit of 1024
(for select()'s sake; gRPC uses epoll), and 1 100 idle connections were measured to
exhaust it: new clients then hang until their deadline, and nothing said why. The
daemon raises its soft limit to the hard one (the unit sets LimitNOFILE) and watches
how many it uses.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource

logger = logging.getLogger(__name__)

WARN_AT = 0.8
"""Share of the limit in use at which the log starts to warn."""
REPEAT_S = 60.0


def raise_soft_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as error:
            logger.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, error)
    return soft


def in_use(limit: int) -> int | None:
    """File descriptors this process has open, or None where /proc cannot tell."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError as error:
        # listing them takes one more: failing for want of one means they are all in use
        return limit if error.errno == errno.EMFILE else None


async def watch(period: float = 2.0) -> None:
    """Warn, at most once a minute, while WARN_AT of the open-file limit or more is in use."""
    last_warning = float("-inf")
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(period)
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        used = in_use(limit)
        if used is None or limit == resource.RLIM_INFINITY or used < WARN_AT * limit:
            continue
        if loop.time() - last_warning >= REPEAT_S:
            last_warning = loop.time()
            state = "exhausted: new connections are refused" if used >= limit - 8 else "nearly exhausted"
            logger.warning(
                "file descriptors %s (%d of %d in use): raise LimitNOFILE in the unit, or find the clients "
                "holding connections open (idle ones are closed after limits.max_connection_idle_s)",
                state, used, limit,
            )
