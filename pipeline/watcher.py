"""Watchdog handler that only wakes the worker: events are a speed-up, the rescan is the truth."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

log = logging.getLogger(__name__)


class WakeOnChange(FileSystemEventHandler):
    """Sets ``wake`` on any event in the inbox; never raises (an exception kills watchdog's thread)."""

    def __init__(self, wake: threading.Event) -> None:
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self.wake.set()
        except Exception:  # pragma: no cover - Event.set does not raise; kept as the catch-all
            log.exception("watcher: could not wake the worker")


def watch(folder: Path, wake: threading.Event) -> BaseObserver | None:
    """Start an observer on ``folder`` (not recursive: new entries are what matter); None if it cannot."""
    observer = Observer()
    observer.schedule(WakeOnChange(wake), str(folder), recursive=False)
    observer.daemon = True
    try:
        observer.start()
    except OSError as exc:
        # inotify limits reached, or a filesystem without events (NFS): rescans still find every job.
        log.warning("watcher: no file events for %s (%s); relying on rescans", folder, exc)
        return None
    return observer
