"""Logging set-up for the programs (the library itself only adds a NullHandler).

Every message is written with its control characters escaped: a newline in a URL (``%0A``) or in a
DICOM UID would otherwise forge a line of the service log (issue 9). Tracebacks keep their lines.
For a log collector, ``--log-json`` or ``log_format: json`` writes one JSON object per line instead (issue 11).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone

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


# What a JSON line may still hold raw: DEL, C1 controls and U+2028/9 are valid in a JSON string but end a line
# for some readers (Python's str.splitlines among them).
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029]")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    and ``exception`` (the traceback's text) when the record has one; for a log collector (issue 11)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # json.dumps escapes C0 controls (newlines included); the rest of _JSON_UNSAFE is escaped here.
        return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(entry, ensure_ascii=False))


def configure_logging(level: str = "INFO", log_format: str | None = None) -> None:
    """Send Postbox's log to stderr at ``level`` (idempotent).

    Parameters
    ----------
    level
        DEBUG, INFO, WARNING or ERROR.
    log_format
        ``text`` (one escaped line per event, the default) or ``json`` (one JSON object per line); None keeps
        the format already set.
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_postbox", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(EscapingFormatter(FORMAT))
        handler._postbox = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    if log_format is not None:
        handler.setFormatter(JsonFormatter() if log_format == "json" else EscapingFormatter(FORMAT))
    root.setLevel(level.upper())
    # pynetdicom and watchdog chatter at INFO/DEBUG is protocol noise for a service log.
    for noisy in ("watchdog", "pynetdicom", "filelock", "pydicom", "highdicom"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
