"""Retrieval of the DICOM inputs a dataset waits for: C-MOVE and C-GET made by a managed worker, and the
series the DICOM node hands over (SEND, MOVE).

PlatiPy's ``dicom_retrieve``. A MOVE asks the dataset's ``from_dicom_location`` to C-STORE the series to
the node, where it completes like any pushed series and is handed over by :meth:`Retrieval.attach_series`;
a GET receives it here, on its own association. The worker has an owner, like :class:`pipeline.sender.Sender`:
``start`` resumes what a stopped service left to fetch (a data object keeps ``fetching`` until its
retrieval ends), ``stop`` ends it; a lock per data object keeps two services on one inbox from fetching
one series twice.
"""

from __future__ import annotations

import logging
import queue
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from pipeline import jobs
from pipeline.audit import AuditLog
from pipeline.config import Config, Destination
from pipeline.errors import InvalidInput
from pipeline.index import Index

from ._paths import hide_paths
from .records import Records

log = logging.getLogger(__name__)

__all__ = ["Retrieval"]

THREADS = 4  # retrievals at once: one slow PACS must not hold up the others


class Retrieval:
    """Fetches the DICOM inputs of datasets (C-MOVE, C-GET) in its own threads, from ``start`` to ``stop``.

    A :class:`~pipeline.doors.Door`, started and stopped with the HTTP door it serves.
    """

    name = "retrieval"

    def __init__(self, config: Config, index: Index, records: Records, audit: AuditLog | None = None) -> None:
        self.config = config
        self.index = index
        self.records = records
        self.audit = audit or AuditLog.beside(config.database)
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    # -- lifecycle --

    def on_job_finished(self, manifest: jobs.JobManifest) -> None:
        """Nothing: a retrieval ends when its series is attached, not when a job does."""

    def on_ready(self) -> None:
        """Nothing: this door serves from its start."""

    def ready_info(self) -> dict[str, Any] | None:
        return None

    def start(self) -> None:
        """Start the worker threads and queue what a stopped service left to fetch; a second call does nothing."""
        with self._lock:
            if self._threads or self._stop.is_set():
                return
            self._threads = [threading.Thread(target=self._run, name=f"dicom-retrieve-{n}", daemon=True)
                             for n in range(THREADS)]
            for t in self._threads:
                t.start()
        left = [o["id"] for o in self.index.find("dataobjects", fetching=True, is_fetched=False)]
        for object_id in left:
            self._queue.put(object_id)
        if left:
            log.info("retrieval: %d retrieval(s) left by the last stop are made again", len(left))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking retrievals; one in flight ends by its own timeouts and is made again at the next start."""
        self._stop.set()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            log.warning("retrieval: a retrieval did not end within %.0f s; it is made again at the next start",
                        timeout)

    def submit(self, record: dict[str, Any]) -> None:
        """Fetch a waiting data object (MOVE or GET); starts the worker if its owner has not yet."""
        self.start()
        self._queue.put(record["id"])

    def _run(self) -> None:
        while not self._stop.is_set():
            object_id = self._queue.get()
            if object_id is None or self._stop.is_set():
                return
            try:
                self._claim_and_fetch(object_id)
            except Exception:
                log.exception("retrieval: data object %d failed unexpectedly; it is tried again at the next start",
                              object_id)

    def _claim_and_fetch(self, object_id: int) -> None:
        lock = jobs.try_lock(jobs.lock_path(self.config.inbox, f"retrieve-{object_id}"))
        if lock is None:
            return  # another service on this inbox is fetching it
        try:
            # Looked at again under the lock: the other service may have ended it meanwhile.
            found = self.index.find("dataobjects", id=object_id, fetching=True, is_fetched=False)
            if found:
                self._fetch(found[0])
        finally:
            lock.release()

    # -- one retrieval --

    def _fetch(self, record: dict[str, Any]) -> None:
        """C-MOVE (the node then receives the series) or C-GET (received here) a waiting DICOM input."""
        from pipeline import retrieve

        uid = record["series_instance_uid"]
        try:
            found = self.index.find("datasets", id=record["dataset"])
            source = self.records.location_of(record["owner"], found[0]["from_dicom_location"]) if found else None
            if source is None:
                raise retrieve.RetrieveFailed("the dataset or its from_dicom_location is gone")
            self.records.check_host(source["host"])  # the operator may have taken it off the list since
            loc = Destination(host=source["host"], port=source["port"], ae_title=source["ae_title"] or "ANY-SCP")
            tls = self.config.location_tls(source["host"])  # the operator's entry says; never the client
            if record["dicom_retrieve"] == "MOVE":
                n = retrieve.move_series(loc, uid, destination_ae=self.config.dicom.ae_title,
                                         calling_ae=self.config.dicom.ae_title, tls=tls)
                self.audit.record("c-move", who=loc.ae_title, address=f"{loc.host}:{loc.port}",
                                  dataset=record["dataset"], series_uid=uid, count=n)
                self.index.update("dataobjects", {"fetching": False,
                                                  "status": f"{n} instance(s) moved; waiting for the series to "
                                                            "complete at the node"}, id=record["id"])
                return
            work = self.records.uploads / f"get-{secrets.token_hex(6)}"
            try:
                n = retrieve.get_series(loc, uid, work / "series", calling_ae=self.config.dicom.ae_title, tls=tls)
                self.audit.record("c-get", who=loc.ae_title, address=f"{loc.host}:{loc.port}",
                                  dataset=record["dataset"], series_uid=uid, count=n)
                if not n:
                    raise retrieve.RetrieveFailed(f"{loc.ae_title} returned no instance of series {uid}")
                self.records.file_series(record, work / "series", f"received {n} instance(s) by C-GET from "
                                                                  f"{loc.ae_title}")
            finally:
                shutil.rmtree(work, ignore_errors=True)
        except (retrieve.RetrieveFailed, InvalidInput, OSError, ValueError) as exc:
            reason = hide_paths(str(exc), self.config)
            log.warning("dataset %d: data object %d: %s", record["dataset"], record["id"], reason)
            # Failed ends the wait: a failed MOVE's data object no longer takes a series that arrives.
            self.index.update("dataobjects", {"status": f"failed: {reason}", "fetching": False, "failed": True},
                              id=record["id"])

    # -- series completed at the DICOM node --

    def attach_series(self, series_uid: str, folder: Path, sender: dict[str, Any]) -> bool:
        """Give a series completed at the DICOM node to the datasets waiting for it from its sender.

        A data object waiting with SEND or MOVE takes a series only from the AE title of its dataset's
        ``from_dicom_location`` (issue 9: before, any sender's series of that UID, a modality's own
        included, went to whichever key waited for it). The node never offers a series that an explicit
        ``dicom.routes`` rule matched. Returns False when no dataset takes it: the node then makes it a job.
        """
        calling = str(sender.get("calling_ae") or "").strip()
        waiting = []
        for record in self.index.find("dataobjects", series_instance_uid=series_uid, is_fetched=False):
            if record.get("dicom_retrieve") not in ("SEND", "MOVE") or record.get("failed"):
                continue
            found = self.index.find("datasets", id=record["dataset"])
            source = self.records.location_of(record["owner"], found[0]["from_dicom_location"]) if found else None
            if source is None or not source["ae_title"] or source["ae_title"].strip() != calling:
                log.info("dataset %d: data object %d does not take series %s: sent by %s, not by its "
                         "from_dicom_location's AE title", record["dataset"], record["id"], series_uid, calling)
                continue
            waiting.append(record)
        if not waiting:
            return False
        n = sum(1 for p in folder.iterdir() if p.suffix == ".dcm")
        for k, record in enumerate(waiting):
            source_dir = folder
            if k < len(waiting) - 1:  # several datasets wait for one series: each gets its own copy
                source_dir = self.records.uploads / f"copy-{secrets.token_hex(6)}"
                shutil.copytree(folder, source_dir)
            self.records.file_series(record, source_dir, f"received {n} instance(s) from {calling}")
        return True
