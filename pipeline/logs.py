"""Logging set-up for the programs (the library itself only adds a NullHandler).

Every message is written with its control characters escaped: a newline in a URL (``%0A``) or in a
DICOM UID would otherwise forge a line of the service log (issue 9). Tracebacks keep their lines.
"""

from __future__ import annotations

import logging
import re
import sys

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# C0 controls, DEL, C1 controls and the Unicode line and paragraph separators: anything a terminal or a
# log reader could take as the end of a line or a command.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """``text`` with its control characters written as escapes (``\\n``, ``\\x1b``, ``\\u2028``)."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                                             else f"\\u{ord(m.group()):04x}"), text)


class EscapingFormatter(logging.Formatter):
    """A Formatter whose message part (the values logged included) is one line, whatever the values hold."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's own name)
        record.message = escape(record.message)
        return super().formatMessage(record)


def configure_logging(level: str = "INFO") -> None:
    """Send Postbox's log to stderr at ``level`` (idempotent)."""
    root = logging.getLogger()
    if not any(getattr(h, "_postbox", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(EscapingFormatter(FORMAT))
        handler._postbox = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level.upper())
    # pynetdicom and watchdog chatter at INFO/DEBUG is protocol noise for a service log.
    for noisy in ("watchdog", "pynetdicom", "filelock", "pydicom", "highdicom"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
