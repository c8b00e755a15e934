"""Retention (issue 11): finished jobs past their rule's age leave the outbox, with everything that names them.

design.md deletes nothing "except by an explicit retention rule"; this is that rule. ``retention.done_days``
and ``retention.failed_days`` say how long a job that ended so is kept, counted from the finish recorded in its
job.yaml (never a file's mtime, which a copy or a restore changes). A purge takes its candidates from the index
(a listing, not 100,000 job.yaml reads) and removes each through :func:`pipeline.jobs.purge`, which takes the
job's lock and its sends' locks and reads its job.yaml again, so the folder decides: a job whose sends are
pending, whose lock another process holds, or which is younger than the index said stays for the next sweep.
After the folders go, in batches: their index entries, the records other parts keep of them (the HTTP door's
site datasets and output data objects, through :attr:`Retention.forgetters`), one audit line per job and one
log line per job (ids only, no patient data).

The service runs it as a door (a thread sweeping every ``retention.sweep_minutes`` once the service is ready);
``postbox manage purge --older-than DAYS`` runs it once by hand.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import jobs
from .audit import AuditLog
from .config import Config
from .errors import DamagedManifest
from .index import Index

log = logging.getLogger(__name__)

__all__ = ["BATCH", "PurgeReport", "Retention"]

BATCH = 2000  # jobs removed between two writes of the index (one rewrite per shard) and the audit log
STATES = ("done", "failed")


@dataclass
class PurgeReport:
    """What one purge removed (with ``dry_run``: would remove) and what it kept and why, by job id."""

    removed: list[jobs.JobManifest] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False

    def counts(self) -> dict[str, int]:
        """Jobs removed by status."""
        found: dict[str, int] = {}
        for m in self.removed:
            found[m.status.value] = found.get(m.status.value, 0) + 1
        return found


def _age_days(text: str | None, now: float) -> float | None:
    """Days from the ISO time ``text`` (UTC unless it says) to ``now``; None if it is not a time."""
    if not text:
        return None
    try:
        when = dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return (now - when.timestamp()) / 86400


class Retention:
    """Removes old finished jobs; a :class:`~pipeline.doors.Door` that sweeps on its own thread.

    Parameters
    ----------
    config
        ``retention`` gives the service's rules; ``purge`` also takes rules of its own (the CLI's).
    index
        The index whose job entries follow the folders.
    who
        Who the audit log names as having removed the jobs (``retention``, or the CLI's ``manage purge``).
    """

    name = "retention"

    def __init__(self, config: Config, index: Index, *, who: str = "retention",
                 audit: AuditLog | None = None) -> None:
        self.config = config
        self.index = index
        self.who = who
        self.audit = audit or AuditLog.beside(config.database)
        # Told the ids of each batch of jobs removed, after their folders and index entries went: the HTTP door
        # forgets its records of them (facade.records.forget_jobs). A hook raising is logged; the purge goes on.
        self.forgetters: list[Callable[[list[str]], Any]] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one purge -------------------------------------------------------------------------------------

    def purge(self, rules: Mapping[str, float], *, dry_run: bool = False, now: float | None = None) -> PurgeReport:
        """Remove the finished jobs older than ``rules`` (days to keep, by status ``done``/``failed``).

        With ``dry_run`` nothing changes: the report says what would go. Never raises for one job: a job that
        cannot be removed now is in the report's ``kept`` with the reason.
        """
        unknown = set(rules) - set(STATES)
        if unknown:
            raise ValueError(f"retention rules are for {' and '.join(STATES)} jobs, not {', '.join(sorted(unknown))}")
        now = time.time() if now is None else now
        cfg = self.config
        report = PurgeReport(dry_run=dry_run)
        if not dry_run:
            self._finish_interrupted()
        if not rules:
            return report

        def old(record: Mapping[str, Any]) -> bool:
            days = rules.get(str(record.get("status")))
            age = _age_days(record.get("finished") or record.get("created"), now)
            return days is not None and age is not None and age >= days

        def keep(manifest: jobs.JobManifest) -> str | None:
            days = rules.get(manifest.status.value)
            if days is None:
                return f"it is {manifest.status.value}, which no rule removes"
            age = _age_days(manifest.finished or manifest.created, now)
            if age is None:
                return "its finish time cannot be read"
            return f"it finished {age:.2f} days ago (kept {days:g})" if age < days else None

        candidates = self.index.jobs(lambda r: r.get("location") == "outbox" and old(r))
        batch: list[jobs.JobManifest] = []
        for record in candidates:
            if self._stop.is_set():
                break
            job_id = record["id"]
            try:
                result = jobs.purge(cfg.inbox, cfg.outbox, job_id, keep=keep, dry_run=dry_run)
            except OSError as exc:
                report.kept[job_id] = f"it could not be removed now ({exc.strerror or type(exc).__name__})"
                log.warning("job %s: retention could not remove it now (%s); trying again at the next sweep",
                            job_id, exc.strerror or type(exc).__name__)
                continue
            if result.kept is not None or result.manifest is None:
                report.kept[job_id] = result.kept or "it is not in the outbox"
                log.debug("job %s: kept by retention: %s", job_id, report.kept[job_id])
                continue
            report.removed.append(result.manifest)
            if not dry_run:
                batch.append(result.manifest)
                if len(batch) >= BATCH:
                    self._forget(batch)
                    batch = []
        if batch:
            self._forget(batch)
        counts = ", ".join(f"{n} {status}" for status, n in sorted(report.counts().items())) or "none"
        if report.removed or report.kept:
            log.info("retention: %s %d job(s) (%s); kept %d for now", "would remove" if dry_run else "removed",
                     len(report.removed), counts, len(report.kept))
        return report

    def _finish_interrupted(self) -> None:
        """Record and delete the jobs that a purge moved out of the outbox before it crashed."""
        left = []
        for job_id in jobs.purged_leftovers(self.config.outbox):
            try:
                left.append(jobs.read_manifest(self.config.outbox / jobs.PURGING / job_id))
            except (OSError, DamagedManifest):  # half deleted: its id is what the record needs
                left.append(jobs.JobManifest(id=job_id, status=jobs.JobStatus.DONE, finished=None))
        if left:
            log.info("retention: finishing the removal of %d job(s) that an interrupted purge left", len(left))
            self._forget(left)

    def _forget(self, removed: list[jobs.JobManifest]) -> None:
        """What follows the folders: index entries, the hooks' records, the audit log, then the folders are
        deleted (so a crash before the audit line leaves them in ``.purging``, to be recorded again)."""
        ids = [m.id for m in removed]
        try:
            self.index.remove_jobs(ids)
        except Exception as exc:  # the folders are the truth: the next start's repair drops the entries
            log.warning("retention: the index could not drop %d removed job(s) now (%s); its next repair will",
                        len(ids), type(exc).__name__)
        for forget in self.forgetters:
            try:
                forget(ids)
            except Exception:
                log.exception("retention: forgetting the records of %d removed job(s) failed", len(ids))
        self.audit.record_jobs("purge", who=self.who, jobs=[(m.id, m.dataset) for m in removed])
        jobs.delete_purged(self.config.outbox, ids)
        for m in removed:
            log.info("job %s: removed by retention (%s, finished %s)", m.id, m.status.value, m.finished or "-")

    def sweep(self) -> PurgeReport:
        """One purge by the configured rules (``retention.done_days``, ``retention.failed_days``)."""
        return self.purge(self.config.retention.rules)

    # -- the door --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sweeping thread; its first sweep waits for the service to be ready (the index repaired)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="retention")
        self._thread.start()
        r = self.config.retention
        log.info("retention: removing done jobs after %s, failed jobs after %s; looking every %g min",
                 f"{r.done_days:g} days" if r.done_days is not None else "never",
                 f"{r.failed_days:g} days" if r.failed_days is not None else "never", r.sweep_minutes)

    def _run(self) -> None:
        while not self._ready.wait(0.5):
            if self._stop.is_set():
                return
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:
                log.exception("retention: the sweep failed; trying again in %g min",
                              self.config.retention.sweep_minutes)
            self._stop.wait(self.config.retention.sweep_minutes * 60)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop sweeping (a purge under way stops between two jobs, its batch recorded)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def on_ready(self) -> None:
        self._ready.set()

    def on_job_finished(self, manifest: jobs.JobManifest) -> None:
        """Nothing: a job that has just finished is the youngest there is."""

    def ready_info(self) -> dict[str, Any] | None:
        return None
