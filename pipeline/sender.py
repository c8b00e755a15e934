"""Results back by C-STORE: a job's DICOM outputs to its destinations, retried with backoff.

The send state per destination and per file lives in the job's job.yaml (``sends``), so ``postbox status``
and the HTTP API show it, a restart resumes what was pending, and after a partial delivery only the files
the destination has not stored go again. A send is claimed like a job, by a lock, so that several services
on one inbox deliver each file once. Sending runs in its own thread and never holds up the worker; stopping
the service aborts a hung association and leaves its send pending, to be resumed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import jobs
from .audit import AuditLog
from .config import Config, Destination
from .crashpoints import crash_point
from .errors import DamagedManifest, PostboxError
from .index import Index
from .tls import TlsFiles

log = logging.getLogger(__name__)

#: C-STORE statuses that mean the peer stored the instance: success, and the warnings that say so.
STORED = {0x0000, 0xB000, 0xB006, 0xB007}
#: job.yaml's ``timings`` key for a destination's send: seconds from the job's finish to the destination's
#: last file stored (issue 10), written with the send state once every file is there.
SEND_TIMING = "send_seconds.{}"
#: ... and from the algorithm's end to the destination's last file stored, sent early or by the sender: the
#: wait a user at the destination feels (issue 10's target: 1 s).
RESULTS_TIMING = "results_seconds.{}"


class SendFailed(PostboxError):
    """A destination did not take every file; ``stored`` are those it did take before it stopped."""

    def __init__(self, reason: str, stored: list[Path] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.stored = list(stored or [])

    def __reduce__(self):
        return (type(self), (self.reason, self.stored))


def _tls_for(cfg: Config, dest: Destination, *, from_http: bool) -> TlsFiles | None:
    """A destination of dicom.destinations has its own ``tls``; a DICOM location made over HTTP gets TLS
    from its host's entry in ``http.allowed_locations``, looked up at each send (the operator's word now)."""
    if from_http:
        return cfg.location_tls(dest.host)
    return dest.tls.files(cfg.base_dir) if dest.tls is not None else None


def resolve_destination(cfg: Config, name: str, target: dict[str, Any] | None
                        ) -> tuple[Destination | None, TlsFiles | None, str | None]:
    """Where a job's send goes: the destination, its TLS, or None and the reason it cannot go now.

    ``target`` is an HTTP-made location's (host, port, AE title); None names ``dicom.destinations.NAME``.
    """
    dest = cfg.dicom.destinations.get(name) if target is None else Destination(**target)
    if dest is None:
        return None, None, f"destination '{name}' is not in dicom.destinations"
    if target is not None and not cfg.http.allows_location(
            dest.host, destinations=[d.host for d in cfg.dicom.destinations.values()]):
        # A location made over HTTP: the operator may have taken its host off the list since.
        return None, None, f"host {dest.host} is no longer on http.allowed_locations"
    return dest, _tls_for(cfg, dest, from_http=target is not None), None


def send_files(dest: Destination, files: list[Path], *, calling_ae: str, timeout: float = 30,
               on_association: Callable[[Any], None] | None = None, tls: TlsFiles | None = None) -> None:
    """C-STORE ``files`` to ``dest`` over one association (over TLS with ``tls``, checking the peer's name).

    Raises
    ------
    SendFailed
        Unless every file is stored; it lists the files that were.
    """
    from pydicom import dcmread  # only a service that sends pays for these imports, not every CLI call
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    datasets = [dcmread(f) for f in files]
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    tls_args = (tls.client_context(), dest.host) if tls is not None else None
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        raise SendFailed(f"no association with {dest.ae_title}@{dest.host}:{dest.port} "
                         f"({'rejected' if assoc.is_rejected else 'refused or unreachable'})")
    if on_association is not None:
        on_association(assoc)
    stored: list[Path] = []
    try:
        for path, ds in zip(files, datasets, strict=True):
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code not in STORED:
                raise SendFailed(f"{dest.ae_title} refused {path.name}: status "
                                 f"{'none (connection lost)' if code is None else hex(code)}", stored)
            stored.append(path)
    finally:
        if on_association is not None:
            on_association(None)
        if assoc.is_established:
            assoc.release()


def abort_association(assoc: Any) -> None:
    """Abort ``assoc`` from another thread, and wake a C-STORE that waits on it for an answer.

    pynetdicom wakes that wait when the peer aborts or the connection drops (its state machine puts
    ``(None, None)`` on the DIMSE queue), but not for an abort of our own: the send would wait on for
    dimse_timeout, past worker.stop_timeout, and the files it had stored would go again after the restart.
    """
    assoc.abort()
    assoc.dimse.msg_queue.put((None, None))


class Sender:
    """Delivers pending sends of finished jobs; wakes on ``notify`` and rescans the index for the rest.

    A :class:`~pipeline.doors.Door`: the service starts it, tells it of each finished job and stops it.
    """

    name = "sender"

    def __init__(self, config: Config, index: Index | None = None, audit: AuditLog | None = None) -> None:
        self.config = config
        self.index = index or Index(config.database)
        self.audit = audit or AuditLog.beside(config.database)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._assoc: Any = None
        self._assoc_lock = threading.Lock()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dicom-sender", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop sending: a hung association is aborted, and its send stays pending for the next start."""
        self._stop.set()
        self._wake.set()
        with self._assoc_lock:
            if self._assoc is not None:
                abort_association(self._assoc)
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            if self._thread.is_alive():
                log.warning("sender: a send did not end within %.0f s; it stays pending for the next start",
                            timeout)

    def on_ready(self) -> None:
        self.notify()  # the index is repaired now: the sends pending at the last stop go

    def on_job_finished(self, manifest: jobs.JobManifest) -> None:
        self.notify(manifest)

    def ready_info(self) -> dict[str, Any] | None:
        return None

    def notify(self, manifest: jobs.JobManifest | None = None) -> None:
        """Wake up: a job with sends pending has finished (or, without a manifest, just look again)."""
        if manifest is None or manifest.sending:
            self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                wait = self.send_due()
            except Exception:
                log.exception("sender: pass failed; trying again")
                wait = 5.0
            self._wake.wait(min(wait, 5.0))

    def send_due(self) -> float:
        """Try every send that is due; returns seconds until the next one is."""
        cfg = self.config
        wait = 5.0
        for rec in self.index.jobs(lambda r: bool(r.get("sending"))):
            if self._stop.is_set():
                break
            try:
                manifest = jobs.read_manifest(cfg.outbox / rec["id"])
            except FileNotFoundError:
                continue
            except DamagedManifest as exc:
                # One damaged job.yaml must not hold up the sends queued behind it (issue 8).
                with jobs.finished_lock(cfg.inbox, rec["id"]):
                    jobs.set_aside(cfg.outbox / rec["id"], cfg.outbox, exc.problem, index=self.index)
                continue
            if not manifest.sending:
                # Sent, but the process died before the index heard of it: tell it, or this job is read
                # on every pass.
                self.index.record_job(manifest, "outbox")
                continue
            for name, state in manifest.sends.items():
                if state.status != jobs.SendStatus.PENDING or self._stop.is_set():
                    continue
                delay = state.next_try - time.time()
                if delay > 0:
                    wait = min(wait, delay)
                    continue
                try:
                    self._attempt(manifest.id, name)
                except Exception:
                    log.exception("job %s: sending to %s failed unexpectedly; trying again later", manifest.id, name)
                wait = min(wait, 0.5)
        return wait

    def _set_assoc(self, assoc: Any) -> None:
        with self._assoc_lock:
            self._assoc = assoc
        if assoc is not None and self._stop.is_set():
            abort_association(assoc)

    def _attempt(self, job_id: str, name: str) -> None:
        cfg = self.config
        lock = jobs.try_lock(jobs.send_lock_path(cfg.inbox, job_id, name))
        if lock is None:
            return  # another service on this inbox is sending it now
        try:
            crash_point("send.claimed")
            self._deliver(job_id, name)
        finally:
            lock.release()

    def _deliver(self, job_id: str, name: str) -> None:
        cfg = self.config
        job_dir = cfg.outbox / job_id
        # Read again under the send's lock: another service may have delivered some files meanwhile.
        manifest = jobs.read_manifest(job_dir)
        state = manifest.sends.get(name)
        if state is None or state.status != jobs.SendStatus.PENDING:
            return
        dest, tls, error = resolve_destination(cfg, name, state.target)
        missing = state.missing
        stored: list[str] = []
        stored_at = 0.0  # when the destination had stored every file (epoch): this attempt's success
        if dest is not None and missing:
            try:
                send_files(dest, [job_dir / f for f in missing], calling_ae=cfg.dicom.ae_title,
                           on_association=self._set_assoc, tls=tls)
                stored, stored_at = missing, time.time()
            except SendFailed as exc:
                error = exc.reason
                stored = [p.relative_to(job_dir).as_posix() for p in exc.stored]
            except (OSError, ValueError) as exc:
                error = getattr(exc, "strerror", None) or type(exc).__name__  # never a server path
        if stored and dest is not None:
            series = next((i.meta_data.get("series_instance_uid") for i in manifest.inputs if i.type == "DICOM"), None)
            self.audit.record("c-store-sent", who=dest.ae_title, address=f"{dest.host}:{dest.port}", job=job_id,
                              dataset=manifest.dataset, series_uid=series, count=len(stored))
        crash_point("send.stored")
        interrupted = error is not None and self._stop.is_set()
        started = manifest.finished or jobs.now_iso()

        def change(m: jobs.JobManifest) -> None:
            s = m.sends[name]
            when = jobs.now_iso()
            for path in stored:
                s.files[path] = when
            if interrupted:
                return  # the service is stopping: this attempt does not count, the send stays pending
            s.attempts += 1
            if not s.missing:
                s.status, s.sent, s.error = jobs.SendStatus.SENT, when, None
                if stored and "finished" in m.timings:
                    m.timings[SEND_TIMING.format(name)] = stored_at - m.timings["finished"]
                if stored and "algorithm_ended" in m.timings:
                    m.timings[RESULTS_TIMING.format(name)] = stored_at - m.timings["algorithm_ended"]
                return
            s.error = error
            elapsed = time.time() - m.timings.get("finished", time.time())
            if dest is None or elapsed >= cfg.dicom.send_retry_seconds:
                s.status = jobs.SendStatus.FAILED
                s.error = f"gave up after {s.attempts} attempt(s): {error}; outputs stay in the outbox"
            else:
                s.next_try = time.time() + min(cfg.dicom.send_backoff_max, 0.5 * 2 ** (s.attempts - 1))

        updated = jobs.update_finished(cfg.inbox, cfg.outbox, job_id, change, index=self.index)
        crash_point("send.recorded")
        s = updated.sends[name]
        if interrupted:
            log.info("job %s: sending to %s interrupted by the stop (%d of %d file(s) stored); it stays pending",
                     job_id, name, len(stored), len(missing))
        elif s.status == jobs.SendStatus.SENT:
            log.info("job %s: sent %d file(s) to %s", job_id, len(stored), name)
        elif s.status == jobs.SendStatus.FAILED:
            log.error("job %s: sending to %s failed: %s", job_id, name, s.error)
        else:
            log.warning("job %s: sending to %s failed (attempt %d, since %s; %d of %d file(s) stored): %s; "
                        "retrying", job_id, name, s.attempts, started, len(stored), len(missing), error)
