"""The audit trail: one JSON line per access to patient data, in ``audit.log`` beside the database.

Hospitals must keep such a record (HIPAA's audit controls, GDPR's accountability). Each line says when, who
(a key's name, or a DICOM AE title) from which address, what (``upload``, ``download``,
``c-store-received``, ``c-store-sent``, ``c-move``, ``c-get``, ``dashboard-view``, ``purge``: a job removed by
retention, issue 11), and which job, dataset
and series. Never a patient's name or ID. Lines are appended with one ``write`` each (atomic for lines of
this size, so several processes may share the file) and synced, so an access is not forgotten in a crash.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FILE_NAME = "audit.log"
ACTIONS = ("upload", "download", "c-store-received", "c-store-sent", "c-move", "c-get", "dashboard-view",
           "purge")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class AuditEntry:
    """One access to patient data; valid once built."""

    action: str
    who: str
    address: str | None = None
    job: str | None = None
    dataset: int | str | None = None
    series_uid: str | None = None
    count: int | None = None  # instances or files, where the access moved several
    time: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"audit action must be one of {', '.join(ACTIONS)}, not {self.action!r}")
        if not isinstance(self.who, str) or not self.who:
            raise ValueError("an audit entry needs who accessed (a key's name or an AE title)")


class AuditLog:
    """Appends entries to, and reads them from, one ``audit.log``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    @classmethod
    def beside(cls, database: Path) -> AuditLog:
        """The audit log of the index at ``database``, in the same folder."""
        return cls(Path(database).with_name(FILE_NAME))

    def record(self, action: str, *, who: str, address: str | None = None, job: str | None = None,
               dataset: int | str | None = None, series_uid: str | None = None, count: int | None = None) -> None:
        """Write one entry. A failure to write is logged, never raised: the access itself has happened."""
        entry = AuditEntry(action=action, who=who, address=address, job=job, dataset=dataset,
                           series_uid=series_uid, count=count)
        self._append(_line(entry), action, who, job)

    def record_jobs(self, action: str, *, who: str, jobs: Iterable[tuple[str, int | str | None]]) -> None:
        """One entry per ``(job, dataset)``, appended with one write and one sync (a purge of thousands of jobs)."""
        entries = [AuditEntry(action=action, who=who, job=job, dataset=dataset) for job, dataset in jobs]
        if entries:
            self._append(b"".join(_line(e) for e in entries), action, who, entries[0].job)

    def _append(self, line: bytes, action: str, who: str, job: str | None) -> None:
        try:
            with self._lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line)
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            log.error("audit: could not record %s by %s (job %s): %s", action, who, job,
                      exc.strerror or type(exc).__name__)

    def entries(self, *, job: str | None = None, since: str | None = None) -> Iterator[dict[str, Any]]:
        """The entries, oldest first, of ``job`` and from ``since`` on (an ISO date or time, or ``24h``)."""
        start = parse_since(since) if since else None
        try:
            fh = open(self.path, encoding="ascii", errors="replace")
        except FileNotFoundError:
            return
        with fh:
            for line in fh:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a full disk: the rest still reads
                if job is not None and entry.get("job") != job:
                    continue
                if start is not None and _when(entry.get("time", "")) < start:
                    continue
                yield entry


def _line(entry: AuditEntry) -> bytes:
    return (json.dumps({k: v for k, v in asdict(entry).items() if v is not None}, ensure_ascii=True)
            + "\n").encode("ascii")


def _when(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        return dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def parse_since(text: str) -> dt.datetime:
    """``--since``: an ISO date or time (UTC unless it says), or a duration back from now (``90m``, ``24h``, ``7d``).

    Raises
    ------
    ValueError
        If it is neither.
    """
    match = _DURATION.match(text.strip())
    if match:
        return dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=float(match[1]) * _SECONDS[match[2]])
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since must be an ISO date or time (2026-11-30, 2026-11-30T08:00) or a duration "
                         f"such as 24h or 7d, not {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
