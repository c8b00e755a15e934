"""The worker: rescan and wake-ups -> claim -> run in a child -> finish or fail. Never raises out of its loop."""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import gate, jobs
from .algorithms import merge_settings, resolve
from .config import AlgorithmConfig, Config
from .dataobject import DataObject
from .errors import AlgorithmFailed, ClaimLost, InvalidInput, UnknownAlgorithm
from .index import Index
from .postprocess import add_dicom_outputs
from .runner import ChildPool, run_command, run_python
from .sender import plan_sends
from .watcher import watch

log = logging.getLogger(__name__)


class _Stopping(Exception):
    """The worker is shutting down: give the job back instead of failing it."""


class Worker:
    """Runs the jobs of one inbox with ``config.worker.processes`` at once.

    Several Worker processes may share an inbox: the file lock of each job decides who runs it, and
    an algorithm's ``max_parallel`` is a set of lock files, so it holds across processes too.
    """

    def __init__(self, config: Config, index: Index | None = None) -> None:
        self.config = config
        self.index = index or Index(config.database)
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._running: dict[str, jobs.Claim] = {}
        self._lock = threading.Lock()
        self._bad_drops: set[Path] = set()
        self._pool = ChildPool(keep_warm=config.worker.keep_warm,
                               max_jobs_per_child=config.worker.max_jobs_per_child)
        self._executor = ThreadPoolExecutor(max_workers=config.worker.processes, thread_name_prefix="job")
        self.ready = threading.Event()
        # Called with each job's manifest once it is done and in the outbox (the sender's wake-up, the HTTP
        # door recording a dataset's outputs); a hook that fails is logged and never fails the job.
        self.finished_hooks: list[Callable[[jobs.JobManifest], None]] = []

    # -- lifecycle --

    def run(self) -> None:
        """Serve until ``stop()``; returns once every running job is finished or given back."""
        cfg = self.config
        for job_id in jobs.recover(cfg.inbox):
            log.info("job %s: recovered from the staging area", job_id)
        self.index.repair(cfg.inbox, cfg.outbox)
        observer = watch(cfg.inbox, self.wake)
        log.info("worker: watching %s (%d at once, algorithms: %s)", cfg.inbox, cfg.worker.processes,
                 ", ".join(a.name for a in cfg.algorithms))
        self.ready.set()
        try:
            while not self._stop.is_set():
                self.wake.clear()
                try:
                    wait = min(cfg.worker.rescan_seconds, self._adopt_drops())
                    self._dispatch()
                except Exception:
                    log.exception("worker: scan failed; trying again")
                    wait = cfg.worker.rescan_seconds
                self.wake.wait(wait)
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
            self._pool.close()
            self._executor.shutdown(wait=True)

    def stop(self) -> None:
        """Ask the loop to end; running jobs are interrupted and go back to the inbox untouched."""
        self._stop.set()
        self._pool.close()
        self.wake.set()

    # -- the two scans --

    def _adopt_drops(self) -> float:
        """Turn settled hand-dropped items into jobs; returns how long until the next may settle."""
        settle = self.config.worker.settle_seconds
        wait = float("inf")
        for item in jobs.dropped_items(self.config.inbox):
            if item in self._bad_drops:
                continue
            age = time.time() - jobs.newest_change(item)
            if age < settle:
                wait = min(wait, settle - age + 0.01)
                continue
            try:
                manifest = jobs.adopt(self.config.inbox, item)
            except (OSError, InvalidInput) as exc:
                log.error("inbox: cannot take %s as a job: %s", item.name, exc)
                self._bad_drops.add(item)
                continue
            if manifest is not None:
                self.index.record_job(manifest, "inbox")
        return wait

    def _dispatch(self) -> None:
        for job_id in jobs.scan(self.config.inbox):
            if self._stop.is_set():
                return
            with self._lock:
                if job_id in self._running:
                    continue
                if len(self._running) >= self.config.worker.processes:
                    return
            claim = jobs.claim(self.config.inbox, job_id)
            if claim is None:
                continue
            capacity = self._take_capacity(claim)
            if capacity is False:
                claim.release()
                continue
            with self._lock:
                self._running[job_id] = claim
            self._executor.submit(self._run_job, claim, capacity)

    def _take_capacity(self, claim: jobs.Claim) -> Any:
        """A lock for one of the algorithm's ``max_parallel`` places: None if unlimited, False if all taken."""
        alg = self.config.algorithm(claim.manifest.algorithm or self.config.default_algorithm)
        if alg is None or alg.max_parallel == 0:
            return None
        safe = "".join(c if c.isalnum() else "_" for c in alg.name)
        for k in range(alg.max_parallel):
            lock = jobs.try_lock(jobs.lock_path(self.config.inbox, f"algorithm-{safe}-{k}"))
            if lock is not None:
                return lock
        return False

    # -- one job --

    def _run_job(self, claim: jobs.Claim, capacity: Any) -> None:
        cfg = self.config
        job_id = claim.job_id
        try:
            m = claim.manifest
            if m.status in (jobs.JobStatus.DONE, jobs.JobStatus.FAILED):
                # Written as finished, but the worker stopped before the move: complete the move.
                if m.status == jobs.JobStatus.DONE:
                    jobs.finish(claim, cfg.outbox)
                else:
                    jobs.fail(claim, cfg.outbox, m.error or "failed")
            elif m.attempts >= cfg.worker.max_attempts:
                jobs.fail(claim, cfg.outbox, f"gave up after {m.attempts} attempt(s): the worker stopped "
                                             "during each (worker.max_attempts)")
            else:
                self._attempt(claim)
            self.index.record_job(claim.manifest, "outbox")
        except _Stopping:
            self._give_back(claim, "the worker is stopping")
        except ClaimLost as exc:
            log.error("job %s: %s", job_id, exc)
        except Exception:
            log.exception("job %s: unexpected error in the worker", job_id)
            try:
                jobs.fail(claim, cfg.outbox, "internal error in the worker (see job.log)", traceback.format_exc())
                self.index.record_job(claim.manifest, "outbox")
            except Exception:
                log.exception("job %s: could not even record the failure; it stays in the inbox", job_id)
        finally:
            if capacity:
                capacity.release()
            claim.release()
            with self._lock:
                self._running.pop(job_id, None)
            self.wake.set()

    def _attempt(self, claim: jobs.Claim) -> None:
        cfg = self.config
        m = claim.manifest
        try:
            if "refused" in m.extra:
                raise InvalidInput(m.extra["refused"])
            alg = resolve(cfg, m.algorithm)
            settings = merge_settings(alg, m.settings)
            m.algorithm = alg.name
            self._gate(claim)
        except (InvalidInput, UnknownAlgorithm) as exc:
            log.warning("job %s: refused: %s", claim.job_id, exc)
            jobs.fail(claim, cfg.outbox, str(exc))
            return
        jobs.start_attempt(claim)
        self.index.record_job(m, "inbox")
        log.info("job %s: started %s (attempt %d)", claim.job_id, alg.name, m.attempts)
        try:
            outputs, timings = self._execute(claim, alg, settings)
            m.timings.update(timings)
            outputs, checks = add_dicom_outputs(alg, self._inputs(claim), outputs, claim.work_dir,
                                                structures=m.extra.get("structures"),
                                                log_line=lambda line: jobs.append_log(claim, line))
            if checks:
                m.extra["check_dice"] = checks
            records = jobs.collect_outputs(claim, outputs)
            if m.extra.get("destinations"):
                if any(r["type"] == "DICOM" for r in records):
                    m.extra["sends"] = plan_sends(m.extra["destinations"])
                else:
                    m.warnings.append("destinations are set but the job has no DICOM outputs to send")
        except (AlgorithmFailed, InvalidInput) as exc:
            if self._stop.is_set():
                raise _Stopping() from exc
            reason = exc.reason
            log.warning("job %s: failed: %s", claim.job_id, reason)
            jobs.fail(claim, cfg.outbox, reason)
            return
        jobs.finish(claim, cfg.outbox, records)
        for hook in self.finished_hooks:
            try:
                hook(m)
            except Exception:
                log.exception("job %s: a finished-job hook failed", claim.job_id)
        log.info("job %s: done in %.2f s", claim.job_id, m.timings["finished"] - m.timings["claimed"])

    def _execute(self, claim: jobs.Claim, alg: AlgorithmConfig,
                 settings: dict[str, Any]) -> tuple[list[DataObject], dict[str, float]]:
        timeout = alg.timeout or self.config.worker.job_timeout
        inputs = self._inputs(claim)
        if self._stop.is_set():
            raise _Stopping()
        if alg.command is not None:
            return run_command(alg, claim.job_id, claim.job_dir / jobs.INPUT, claim.work_dir, settings,
                               claim.log_path, timeout, stop=self._stop)
        try:
            return run_python(self._pool, alg, claim.job_id, inputs, claim.work_dir, settings, claim.log_path,
                              timeout)
        except RuntimeError as exc:  # the pool is closed: we are stopping
            raise _Stopping() from exc

    def _gate(self, claim: jobs.Claim) -> None:
        """Check each DICOM input is one whole volume; fail or warn by ``dicom.incomplete``."""
        for d in self._inputs(claim):
            if d.type != "DICOM":
                continue
            # The DICOM node checked its series at completion; a job's inputs never change after commit.
            recorded = d.meta_data.get("gate")
            found = list(recorded) if isinstance(recorded, list) else gate.problems(Path(d.path))
            if not found:
                continue
            reason = f"incomplete series {d.id}: {gate.summary(found)}"
            if self.config.dicom.incomplete == "fail":
                raise InvalidInput(reason + " (dicom.incomplete: fail)")
            if reason not in claim.manifest.warnings:
                claim.manifest.warnings.append(reason)
            jobs.append_log(claim, f"warning: {reason}; running anyway (dicom.incomplete: run)")
            log.warning("job %s: %s; running anyway", claim.job_id, reason)

    @staticmethod
    def _inputs(claim: jobs.Claim) -> list[DataObject]:
        return [DataObject(type=d["type"], path=str(claim.job_dir / d["path"]), meta_data=d.get("meta_data", {}),
                           id=d["id"]) for d in claim.manifest.inputs]

    def _give_back(self, claim: jobs.Claim, reason: str) -> None:
        try:
            jobs.requeue(claim, reason)
            self.index.record_job(claim.manifest, "inbox")
            log.info("job %s: given back to the inbox (%s)", claim.job_id, reason)
        except Exception:
            log.exception("job %s: could not give it back; the next start runs it again", claim.job_id)
