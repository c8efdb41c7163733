"""Structured logs: one line an event, as text (key=value) or JSON, on stderr.

When stderr is the journal (systemd sets JOURNAL_STREAM to its device and inode), each line
starts with its syslog priority (`<4>` for a warning; the unit's SyslogLevelPrefix=yes, the
default, reads it) and carries no timestamp of its own: the journal has one. Python warnings
and the libraries' loggers (transformers, huggingface_hub) go through the same handler, once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Mapping

PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
"""syslog priorities of the logging levels."""
LIBRARIES = ("transformers", "huggingface_hub")


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line = f"{stamp} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _JournalFormatter(logging.Formatter):
    """`<priority>` and the line, without the timestamp the journal adds itself."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        priority = PRIORITIES.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return f"<{priority}>{self.inner.format(record)}"


class _UntimedTextFormatter(_TextFormatter):
    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).split(" ", 1)[1]


def stderr_is_journal(environ: Mapping[str, str]) -> bool:
    """Whether stderr is the journal stream systemd names in JOURNAL_STREAM ("device:inode")."""
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


def configure(level: str = "info", style: str = "text", environ: Mapping[str, str] | None = None) -> None:
    journal = stderr_is_journal(os.environ if environ is None else environ)
    formatter: logging.Formatter = _JsonFormatter() if style == "json" else (
        _UntimedTextFormatter() if journal else _TextFormatter()
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JournalFormatter(formatter) if journal else formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    _through_root(LIBRARIES)
    # transformers reports loading progress with bars and tables: not events of ours
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass


def _through_root(libraries: tuple[str, ...]) -> None:
    """The libraries' own stderr handlers removed, their records propagated to ours: each line once."""
    import importlib

    for name in libraries:
        try:
            importlib.import_module(f"{name}.utils.logging")  # sets its handler up, so that it can be removed
        except ImportError:
            continue
        library = logging.getLogger(name)
        library.handlers.clear()
        library.propagate = True

