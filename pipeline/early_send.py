"""Send a running job's DICOM outputs to its destinations as each is written, before the job finishes.

Issue 10: a physicist at the planning system waits for the RTSTRUCT and SEG, not for the job's bookkeeping.
So while the worker writes the SEG, the checked RTSTRUCT is already on its way, and each destination keeps
one association open for all of the job's files. What is stored here is recorded in job.yaml
(``early_sent``: SOP Instance UIDs per destination) before the job finishes, and the job's sends start
with those files stored; whatever did not go (a destination down, a refusal) is left to the sender, with
its retries, after the finish.

Exactly once: the outputs' UIDs derive from the job id, so a job run again after a crash writes the same
instances. One stored but not yet recorded (a crash in between) goes again and is stored once by a PACS;
one recorded is not sent again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .audit import AuditLog
from .config import Config, Destination
from .sender import STORED, abort_association, resolve_destination
from .tls import TlsFiles

log = logging.getLogger(__name__)

__all__ = ["EarlySend"]

_END = None


@dataclass
class _Lane:
    """One destination: its own thread, queue and association."""

    name: str
    dest: Destination
    tls: TlsFiles | None
    already: set[str]  # SOP Instance UIDs recorded as stored by an earlier attempt
    files: queue.Queue[Path | None] = field(default_factory=queue.Queue)
    stored: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> the file's path as offered
    last_stored: float = 0.0  # when the last file was stored (epoch)
    error: str | None = None
    assoc: Any = None
    thread: threading.Thread | None = None


class EarlySend:
    """The sends of one running job: :meth:`offer` each file as it is written, then :meth:`close`.

    Parameters
    ----------
    config
        The service's config (the destinations, our AE title, TLS of HTTP-made locations).
    job_id
        For the log and the audit trail.
    destinations
        The job's destinations: a name from ``dicom.destinations``, or an HTTP-made location's target.
    already
        Per destination name, the SOP Instance UIDs an earlier attempt of this job recorded as stored.
    """

    def __init__(self, config: Config, job_id: str, destinations: dict[str, dict[str, Any] | None], *,
                 already: dict[str, list[str]] | None = None, audit: AuditLog | None = None,
                 dataset: str | None = None, series_uid: str | None = None) -> None:
        self.config = config
        self.job_id = job_id
        self.audit = audit or AuditLog.beside(config.database)
        self.dataset, self.series_uid = dataset, series_uid
        self._lanes: list[_Lane] = []
        self._closing = threading.Event()
        for name, target in destinations.items():
            dest, tls, problem = resolve_destination(config, name, target)
            if dest is None:
                log.info("job %s: results for %s are left to the sender (%s)", job_id, name, problem)
                continue
            lane = _Lane(name, dest, tls, set((already or {}).get(name, [])))
            lane.thread = threading.Thread(target=self._run, args=(lane,), name=f"early-send-{name}", daemon=True)
            lane.thread.start()
            self._lanes.append(lane)

    def offer(self, path: Path) -> None:
        """Send ``path`` (a finished, checked output) to every destination; returns at once."""
        for lane in self._lanes:
            lane.files.put(path)

    def close(self, timeout: float, stop: threading.Event | None = None) -> dict[str, dict[str, str]]:
        """Wait up to ``timeout`` s (or until ``stop`` is set) for the files offered to be sent; then abort
        what still runs.

        Returns, per destination name, the SOP Instance UIDs stored now or by an earlier attempt, each with
        the path of its file as offered (the sender sends the rest after the job's finish).
        """
        for lane in self._lanes:
            lane.files.put(_END)
        deadline = time.monotonic() + timeout
        for lane in self._lanes:
            assert lane.thread is not None
            while lane.thread.is_alive() and time.monotonic() < deadline and not (stop and stop.is_set()):
                lane.thread.join(min(0.1, max(0.0, deadline - time.monotonic())))
        self._closing.set()
        for lane in self._lanes:
            assert lane.thread is not None
            if lane.thread.is_alive():
                log.warning("job %s: sending to %s early did not end within %.0f s; the sender goes on after "
                            "the job's finish", self.job_id, lane.name, timeout)
                if lane.assoc is not None:
                    abort_association(lane.assoc)
                lane.thread.join(5.0)
        return {lane.name: dict(lane.stored) for lane in self._lanes}

    def last_stored(self, name: str) -> float:
        """When destination ``name`` stored its last file here (epoch), 0 if none."""
        return next((lane.last_stored for lane in self._lanes if lane.name == name), 0.0)

    # -- one destination --

    def _run(self, lane: _Lane) -> None:
        from pydicom import dcmread
        from pynetdicom import AE

        ae = AE(ae_title=self.config.dicom.ae_title)
        timeout = 30
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        try:
            while (path := lane.files.get()) is not _END:
                if lane.error is not None or self._closing.is_set():
                    continue  # drain: the sender sends what is left after the finish
                try:
                    ds = dcmread(path)
                    uid = str(ds.SOPInstanceUID)
                    if uid in lane.already:
                        lane.stored[uid] = str(path)
                        continue
                    if lane.assoc is None:
                        lane.assoc = self._associate(ae, lane)
                    status = lane.assoc.send_c_store(ds)
                    code = getattr(status, "Status", None)
                    if code not in STORED:
                        raise _Refused(f"{lane.dest.ae_title} refused {path.name}: status "
                                       f"{'none (connection lost)' if code is None else hex(code)}")
                    lane.stored[uid] = str(path)
                    lane.last_stored = time.time()
                    self.audit.record("c-store-sent", who=lane.dest.ae_title,
                                      address=f"{lane.dest.host}:{lane.dest.port}", job=self.job_id,
                                      dataset=self.dataset, series_uid=self.series_uid, count=1)
                    log.info("job %s: %s sent to %s before the job's finish", self.job_id, path.name, lane.name)
                except (_Refused, OSError, ValueError, AttributeError, RuntimeError) as exc:
                    lane.error = str(exc) if isinstance(exc, _Refused) else type(exc).__name__
                    log.info("job %s: sending to %s early stopped (%s); the sender goes on after the job's "
                             "finish", self.job_id, lane.name, lane.error)
        finally:
            if lane.assoc is not None and lane.assoc.is_established:
                lane.assoc.release()

    def _associate(self, ae: Any, lane: _Lane) -> Any:
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom.sop_class import RTStructureSetStorage, SegmentationStorage  # type: ignore[attr-defined]

        for sop_class in (RTStructureSetStorage, SegmentationStorage):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        tls_args = (lane.tls.client_context(), lane.dest.host) if lane.tls is not None else None
        assoc = ae.associate(lane.dest.host, lane.dest.port, ae_title=lane.dest.ae_title, tls_args=tls_args)
        if not assoc.is_established:
            raise _Refused(f"no association with {lane.dest.ae_title}@{lane.dest.host}:{lane.dest.port}")
        return assoc


class _Refused(Exception):
    pass
