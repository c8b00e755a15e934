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


def _no_move_pairing() -> None:
    """Stop watchdog holding events back to pair moves.

    watchdog's inotify backend holds every "moved out" event for 0.5 s hoping to pair it with a "moved in",
    and its queue is first-in-first-out, so a job committed within 0.5 s of another leaving for the outbox
    waited that long to be seen (bench/pipeline.py: pickup p50 477 ms). Postbox only needs "something
    changed", never paired moves.
    """
    try:
        from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
    except ImportError:  # not Linux, or another watchdog layout: rescans still bound the delay
        return
    InotifyMoveEventGrouper.delay = 0.0


def watch(folder: Path, wake: threading.Event) -> BaseObserver | None:
    """Start an observer on ``folder`` (not recursive: new entries are what matter); None if it cannot."""
    _no_move_pairing()
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
