"""What is wrong with one running service now (a full disk, say): told by its parts, read by /api/health.

The worker, the DICOM node and the HTTP door report a problem when they meet it and clear it when the
thing that failed works again; each change is logged once, not on every retry.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path

from .errors import DiskFull

log = logging.getLogger(__name__)

DISK_FULL = "disk full"
SCHEDULER_LOST = "dask scheduler out of reach"
# ENOSPC: no blocks left; EDQUOT: the user's quota is used up. Both cure themselves when space returns.
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a write refused for want of space."""
    while exc is not None:
        if isinstance(exc, DiskFull) or isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def is_disk_full_errno(number: object) -> bool:
    return number in _DISK_FULL_ERRNOS


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class Health:
    """The current problems of one service, by name; thread-safe."""

    def __init__(self) -> None:
        self._problems: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def report(self, problem: str, detail: str) -> bool:
        """Note ``problem`` (e.g. :data:`DISK_FULL`) with a line of detail; True if it is new."""
        with self._lock:
            new = problem not in self._problems
            self._problems[problem] = (detail, self._problems.get(problem, ("", time.time()))[1])
        if new:
            log.warning("service: degraded: %s (%s)", problem, detail)
        return new

    def clear(self, problem: str) -> None:
        with self._lock:
            gone = self._problems.pop(problem, None)
        if gone is not None:
            log.info("service: %s is over after %.0f s", problem, time.time() - gone[1])

    def problems(self) -> list[str]:
        """Each current problem as ``"<problem>: <detail>"``, oldest first."""
        with self._lock:
            items = sorted(self._problems.items(), key=lambda kv: kv[1][1])
        return [f"{name}: {detail}" for name, (detail, _since) in items]

    def has(self, problem: str) -> bool:
        with self._lock:
            return problem in self._problems


class Throttle:
    """Say something at most once per ``seconds`` (a problem that lasts is logged once a minute, not per retry)."""

    def __init__(self, seconds: float = 60.0) -> None:
        self.seconds = seconds
        self._last: dict[str, float] = {}

    def due(self, key: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -1e18) >= self.seconds:
            self._last[key] = now
            return True
        return False

    def reset(self, key: str) -> None:
        self._last.pop(key, None)
