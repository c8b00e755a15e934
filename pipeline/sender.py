"""Results back by C-STORE: a job's DICOM outputs to its destinations, retried with backoff.

The send state per destination lives in the job's job.yaml (``extra.sends``), so ``postbox status`` and
the HTTP API show it and a restart resumes what was pending. Sending runs in its own thread and never
holds up the worker.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from . import jobs
from .config import Config, Destination
from .index import Index

log = logging.getLogger(__name__)

_OK = {0x0000, 0xB000, 0xB006, 0xB007}  # success, and warnings meaning stored


class SendFailed(Exception):
    """A destination did not take the files; the reason says why."""


def send_files(dest: Destination, files: list[Path], *, calling_ae: str, timeout: float = 30) -> None:
    """C-STORE ``files`` to ``dest`` over one association; SendFailed unless every one is stored."""
    from pydicom import dcmread  # only a service that sends pays for these imports, not every CLI call
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    datasets = [dcmread(f) for f in files]
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        raise SendFailed(f"no association with {dest.ae_title}@{dest.host}:{dest.port} "
                         f"({'rejected' if assoc.is_rejected else 'refused or unreachable'})")
    try:
        for path, ds in zip(files, datasets, strict=True):
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code not in _OK:
                raise SendFailed(f"{dest.ae_title} refused {path.name}: status "
                                 f"{'none (connection lost)' if code is None else hex(code)}")
    finally:
        if assoc.is_established:
            assoc.release()


def plan_sends(destinations: list[Any]) -> dict[str, dict[str, Any]]:
    """The initial send state for a job's destinations (names from config, or inline host/port/ae_title)."""
    sends = {}
    for dest in destinations:
        name = dest if isinstance(dest, str) else f"{dest['ae_title']}@{dest['host']}:{dest['port']}"
        sends[name] = {"status": "pending", "attempts": 0, "next_try": 0.0, "error": None, "sent": None,
                       "target": None if isinstance(dest, str) else dict(dest)}
    return sends


class Sender:
    """Delivers pending sends of finished jobs; wakes on ``notify`` and rescans the index for the rest."""

    def __init__(self, config: Config, index: Index | None = None) -> None:
        self.config = config
        self.index = index or Index(config.database)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dicom-sender", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def notify(self, manifest: jobs.JobManifest | None = None) -> None:
        """Wake up: a job with sends pending has finished (or, without a manifest, just look again)."""
        if manifest is None or manifest.extra.get("sends"):
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
        wait = 5.0
        for rec in self.index.jobs(lambda r: bool(r.get("sending"))):
            if self._stop.is_set():
                break
            job_dir = self.config.outbox / rec["id"]
            try:
                manifest = jobs.read_manifest(job_dir)
            except FileNotFoundError:
                continue
            for name, state in manifest.extra.get("sends", {}).items():
                if state["status"] != "pending":
                    continue
                delay = state["next_try"] - time.time()
                if delay > 0:
                    wait = min(wait, delay)
                    continue
                self._attempt(manifest, name)
                wait = min(wait, 0.5)
        return wait

    def _attempt(self, manifest: jobs.JobManifest, name: str) -> None:
        cfg = self.config
        job_dir = cfg.outbox / manifest.id
        state = manifest.extra["sends"][name]
        dest = cfg.dicom.destinations.get(name) if state.get("target") is None else Destination(**state["target"])
        files = [job_dir / o["path"] for o in manifest.outputs if o["type"] == "DICOM"]
        error: str | None = None
        if dest is None:
            error = f"destination '{name}' is not in dicom.destinations"
        elif not files:
            error = "the job has no DICOM outputs to send"
        else:
            try:
                send_files(dest, files, calling_ae=cfg.dicom.ae_title)
            except (SendFailed, OSError, ValueError) as exc:
                error = str(exc)
        started = manifest.finished or jobs.now_iso()

        def change(m: jobs.JobManifest) -> None:
            s = m.extra["sends"][name]
            s["attempts"] += 1
            if error is None:
                s.update(status="sent", sent=jobs.now_iso(), error=None)
                return
            s["error"] = error
            elapsed = time.time() - m.timings.get("finished", time.time())
            if dest is None or not files or elapsed >= cfg.dicom.send_retry_seconds:
                s["status"] = "failed"
                s["error"] = f"gave up after {s['attempts']} attempt(s): {error}; outputs stay in the outbox"
            else:
                s["next_try"] = time.time() + min(cfg.dicom.send_backoff_max, 0.5 * 2 ** (s["attempts"] - 1))

        updated = jobs.update_finished(cfg.inbox, cfg.outbox, manifest.id, change)
        self.index.record_job(updated, "outbox")
        s = updated.extra["sends"][name]
        if s["status"] == "sent":
            log.info("job %s: sent %d file(s) to %s", manifest.id, len(files), name)
        elif s["status"] == "failed":
            log.error("job %s: sending to %s failed: %s", manifest.id, name, s["error"])
        else:
            log.warning("job %s: sending to %s failed (attempt %d, since %s): %s; retrying", manifest.id, name,
                        s["attempts"], started, error)
        manifest.extra["sends"][name] = s
