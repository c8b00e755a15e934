"""Logging set-up for the programs (the library itself only adds a NullHandler)."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Send Postbox's log to stderr at ``level`` (idempotent)."""
    root = logging.getLogger()
    if not any(getattr(h, "_postbox", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._postbox = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level.upper())
    # pynetdicom and watchdog chatter at INFO/DEBUG is protocol noise for a service log.
    for noisy in ("watchdog", "pynetdicom", "filelock", "pydicom", "highdicom"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
