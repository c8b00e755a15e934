"""The worker: rescan and wake-ups -> claim -> run in a child -> finish or fail. Never raises out of its loop.

One job's trouble stays that job's (design.md): a job whose lock cannot be taken waits and is named once in
the log, a damaged job.yaml is set aside, and a full disk pauses the work with backoff, without using up
any job's attempts, until space returns.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import attempts, gate, jobs
from .algorithms import merge_settings, resolve
from .config import AlgorithmConfig, Config
from .crashpoints import crash_point
from .dataobject import DataObject
from .early_send import EarlySend
from .errors import AlgorithmFailed, ClaimLost, DamagedManifest, InvalidInput, UnknownAlgorithm
from .health import DISK_FULL, Health, Throttle, free_bytes, is_disk_full
from .index import Index
from .postprocess import add_dicom_outputs
from .runner import ChildPool, PoolClosed, run_command, run_python
from .sender import RESULTS_TIMING
from .watcher import watch

if TYPE_CHECKING:
    from .dask_engine import DaskEngine

log = logging.getLogger(__name__)

#: Seconds the worker waits, after the SEG is written, for the early sends to end before it finishes the
#: job; what has not gone by then is sent by the sender after the finish.
EARLY_SEND_WAIT = 10.0


class _Stopping(Exception):
    """The worker is shutting down: give the job back instead of failing it."""


class Worker:
    """Runs the jobs of one inbox with ``config.worker.processes`` at once.

    Several Worker processes may share an inbox: the file lock of each job decides who runs it, and
    an algorithm's ``max_parallel`` is a set of lock files, so it holds across processes too.
    """

    def __init__(self, config: Config, index: Index | None = None, health: Health | None = None) -> None:
        self.config = config
        self.index = index or Index(config.database)
        self.health = health or Health()
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._running: dict[str, jobs.Claim] = {}
        # On a cluster: running jobs whose remote attempt has ended (the service writes their DICOM outputs);
        # they hold no slot, so the GPU takes the next job meanwhile.
        self._past_remote: set[str] = set()
        self._lock = threading.Lock()
        self._bad_drops: set[Path] = set()
        self._waiting: dict[str, str] = {}  # job id -> why it waits, each said once
        self._uncounted: set[str] = set()  # given back for a full disk, but that could not be written down
        self._recover_left = 0
        self._paused_until = 0.0  # no claims before this (monotonic): the disk is full
        self._backoff = 0.0
        self._throttle = Throttle(60.0)
        self._pool = ChildPool(keep_warm=config.worker.keep_warm,
                               max_jobs_per_child=config.worker.max_jobs_per_child)
        # On a Dask cluster (issue 12) a running job's thread only waits for its remote attempt: as many as the
        # cluster has slots, which the engine tells.
        self._engine: DaskEngine | None = None
        if config.engine.kind == "dask":
            from .dask_engine import DaskEngine  # distributed is imported only where it is used

            self._engine = DaskEngine(config, self.wake, self.health)
        self._executor = ThreadPoolExecutor(max_workers=config.worker.processes if self._engine is None else 256,
                                            thread_name_prefix="job")
        self.ready = threading.Event()
        # Called with each job's manifest once it is done and in the outbox (the sender's wake-up, the HTTP
        # door recording a dataset's outputs); a hook that fails is logged and never fails the job.
        self.finished_hooks: list[Callable[[jobs.JobManifest], None]] = []

    # -- lifecycle --

    def run(self) -> None:
        """Serve until ``stop()``; returns once every running job is finished or given back.

        Raises what stops it from starting at all (the service then exits non-zero).
        """
        cfg = self.config
        # Every door stages its jobs in .staging and every claim takes its lock in .locks: a file in the place of
        # either is a fatal start error (issue 8: exit non-zero), not a service that says ready and takes nothing.
        for folder in (jobs.STAGING, jobs.LOCKS):
            (cfg.inbox / folder).mkdir(exist_ok=True)
        self._recover()
        self.index.repair(cfg.inbox, cfg.outbox)
        if self._engine is not None:
            self._engine.start()
        observer = watch(cfg.inbox, self.wake)
        log.info("worker: watching the inbox (%d at once, algorithms: %s)", cfg.worker.processes,
                 ", ".join(a.name for a in cfg.algorithms))
        self.ready.set()
        try:
            while not self._stop.is_set():
                self.wake.clear()
                try:
                    if self._recover_left:
                        self._recover()
                    wait = min(cfg.worker.rescan_seconds, self._adopt_drops())
                    paused = self._paused_until - time.monotonic()
                    if paused > 0:
                        wait = min(wait, paused)
                    else:
                        self._dispatch()
                except Exception as exc:
                    if is_disk_full(exc):
                        self._disk_full("the inbox scan", exc)
                    else:
                        log.exception("worker: scan failed; trying again")
                    wait = cfg.worker.rescan_seconds
                self.wake.wait(wait)
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
            self._pool.close()
            self._executor.shutdown(wait=True)
            if self._engine is not None:
                self._engine.close()

    def stop(self) -> None:
        """Stop claiming at once; running jobs are interrupted and go back to the inbox untouched."""
        self._stop.set()
        self._pool.close()
        if self._engine is not None:
            self._engine.stop()
        self.wake.set()

    def _recover(self) -> None:
        done, self._recover_left = jobs.recover(self.config.inbox, self.config.outbox, index=self.index)
        for job_id in done:
            log.info("job %s: recovered from the staging area", job_id)

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
                jobs.adopt(self.config.inbox, item, index=self.index)
            except (OSError, InvalidInput) as exc:
                if is_disk_full(exc):
                    # The item stays where it is, or half way in staging: recover() finishes it with space.
                    self._recover_left += 1
                    raise
                log.error("inbox: cannot take %s as a job: %s", item.name, exc)
                self._bad_drops.add(item)
        return wait

    def _dispatch(self) -> None:
        cfg = self.config
        pending = jobs.scan(cfg.inbox)
        present = set(pending)
        for job_id in [j for j in self._waiting if j not in present]:
            del self._waiting[job_id]  # gone from the inbox: if it comes back, it is said again
        for job_id in pending:
            if self._stop.is_set() or time.monotonic() < self._paused_until:
                return
            with self._lock:
                if job_id in self._running:
                    continue
                if len(self._running) - len(self._past_remote) >= self._limit():
                    return
            try:
                claim = jobs.claim(cfg.inbox, cfg.outbox, job_id, index=self.index)
            except OSError as exc:
                if is_disk_full(exc):
                    raise
                # One job's problem stays that job's: the jobs behind it are still dispatched.
                self._wait(job_id, f"its lock cannot be taken ({exc.strerror or type(exc).__name__})", error=True)
                continue
            if claim is None:
                self._held_elsewhere(job_id)
                continue
            capacity = self._take_capacity(claim)
            if capacity is False:
                claim.release()
                self._wait(job_id, f"algorithm '{claim.manifest.algorithm}' already runs its max_parallel jobs")
                continue
            self._waiting.pop(job_id, None)
            with self._lock:
                self._running[job_id] = claim
            self._executor.submit(self._run_job, claim, capacity)

    def _limit(self) -> int:
        """Jobs this service runs at once: ``worker.processes``, or on a cluster its free slots."""
        return self.config.worker.processes if self._engine is None else self._engine.slots()

    def _held_elsewhere(self, job_id: str) -> None:
        """Another process holds the job's lock: normal if it runs the job, worth a line if not."""
        try:
            status = jobs.read_manifest(self.config.inbox / job_id).status
        except (FileNotFoundError, DamagedManifest):
            return  # finished meanwhile, or being set aside by the holder
        if status == jobs.JobStatus.RUNNING:
            log.debug("job %s: runs in another process", job_id)
            return
        self._wait(job_id, "another process holds its lock without running it (a stuck process, or one "
                           "that is only now starting it); it runs here when the lock is freed")

    def _wait(self, job_id: str, why: str, *, error: bool = False) -> None:
        if self._waiting.get(job_id) != why:
            self._waiting[job_id] = why
            log.log(logging.ERROR if error else logging.INFO, "job %s: waits: %s", job_id, why)

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

    # -- a full disk --

    def _disk_full(self, what: str, exc: BaseException | None = None) -> None:
        """Pause claiming with backoff; said once a minute while it lasts."""
        max_wait = self.config.worker.disk_full_backoff_max
        self._backoff = min(max_wait, self._backoff * 2 if self._backoff else min(1.0, max_wait))
        self._paused_until = time.monotonic() + self._backoff
        try:
            free = f"{free_bytes(self.config.inbox) / 1e6:.1f} MB free"
        except OSError:
            free = "free space unknown"
        self.health.report(DISK_FULL, f"{free} on the inbox's filesystem")
        if self._throttle.due(DISK_FULL):
            log.warning("worker: disk full during %s (%s); jobs wait, their attempts not counted; trying again "
                        "in %.0f s (said once a minute while it lasts)", what, free, self._backoff)

    def _disk_ok(self) -> None:
        if self._backoff:
            self._backoff = 0.0
            self._throttle.reset(DISK_FULL)
            self.health.clear(DISK_FULL)

    # -- one job --

    def _run_job(self, claim: jobs.Claim, capacity: Any) -> None:
        cfg = self.config
        job_id = claim.job_id
        try:
            m = claim.manifest
            if self._engine is not None and m.status not in (jobs.JobStatus.DONE, jobs.JobStatus.FAILED):
                m.attempts = attempts.counted(claim.job_dir)  # a cluster's attempts are its folders (issue 12)
            if m.status in (jobs.JobStatus.DONE, jobs.JobStatus.FAILED):
                # Written as finished, but the worker stopped before the move: complete the move.
                if m.status == jobs.JobStatus.DONE:
                    jobs.finish(claim, cfg.outbox)
                else:
                    jobs.fail(claim, cfg.outbox, self._relative(claim, m.error or "failed"))
            elif m.attempts >= cfg.worker.max_attempts and job_id not in self._uncounted:
                where = "the worker stopped" if self._engine is None else "its GPU node's worker process died"
                jobs.fail(claim, cfg.outbox, f"gave up after {m.attempts} attempt(s): {where} during each "
                                             "(worker.max_attempts)")
            else:
                self._attempt(claim)
        except _Stopping:
            self._give_back(claim, "the worker is stopping")
        except ClaimLost as exc:
            log.error("job %s: %s", job_id, exc)
        except Exception as exc:
            if is_disk_full(exc):
                self._disk_full(f"job {job_id}", exc)
                self._give_back(claim, "the disk is full; it runs again when there is space", disk_full=True)
                return
            log.exception("job %s: unexpected error in the worker", job_id)
            try:
                jobs.fail(claim, cfg.outbox, "internal error in the worker (see job.log)", traceback.format_exc())
            except Exception:
                log.exception("job %s: could not even record the failure; it stays in the inbox", job_id)
        finally:
            if capacity:
                capacity.release()
            if claim.manifest.status in (jobs.JobStatus.DONE, jobs.JobStatus.FAILED):
                # Every job that ends, done or failed (its waiting status requests, its sends), however it
                # ended: also one finished or failed by recovery.
                for hook in self.finished_hooks:
                    try:
                        hook(claim.manifest)
                    except Exception:
                        log.exception("job %s: a finished-job hook failed", job_id)
            claim.release()
            with self._lock:
                self._running.pop(job_id, None)
                self._past_remote.discard(job_id)
            self.wake.set()

    def _attempt(self, claim: jobs.Claim) -> None:
        cfg = self.config
        m = claim.manifest
        try:
            if m.refused:
                raise InvalidInput(m.refused)
            alg = resolve(cfg, m.algorithm)
            settings = merge_settings(alg, m.settings)
            m.algorithm = alg.name
            self._gate(claim)
        except (InvalidInput, UnknownAlgorithm) as exc:
            reason = self._relative(claim, str(exc))
            log.warning("job %s: refused: %s", claim.job_id, reason)
            jobs.fail(claim, cfg.outbox, reason)
            return
        resumed = m.status == jobs.JobStatus.RUNNING
        if self._engine is not None:
            m.attempts += 1  # the number the remote attempt's folder will most likely have; its folder decides
        jobs.start_attempt(claim, counted=self._engine is None and claim.job_id not in self._uncounted)
        self._uncounted.discard(claim.job_id)
        log.info("job %s: started %s (attempt %d)", claim.job_id, alg.name, m.attempts)
        early: EarlySend | None = None
        try:
            outputs, timings = self._execute(claim, alg, settings, resumed=resumed)
            if self._engine is not None:
                with self._lock:
                    self._past_remote.add(claim.job_id)
                self.wake.set()
            m.timings.update(timings)
            early = self._early_send(claim, alg)
            added = add_dicom_outputs(alg, self._inputs(claim), outputs, claim.work_dir, job_id=claim.job_id,
                                      structures=m.delivery.structures,
                                      log_line=lambda line: jobs.append_log(claim, line),
                                      on_written=early.offer if early is not None else None)
            m.checks = added.checks
            m.timings.update(added.timings)
            # Issue 10: a rerun from here must write the same instances (their UIDs derive from the job id).
            crash_point("outputs.written")
            stored: dict[str, dict[str, str]] = {}
            if early is not None:
                stored = early.close(EARLY_SEND_WAIT, self._stop)
                self._record_early(claim, stored)
                crash_point("send.early_recorded")
            records = jobs.collect_outputs(claim, added.outputs)
            if m.delivery.destinations:
                if any(r.type == "DICOM" for r in records):
                    m.sends = m.delivery.plan(records)
                    _mark_sent_early(m, [o.path for o in added.outputs], records, stored, early)
                else:
                    m.warnings.append("destinations are set but the job has no DICOM outputs to send")
        except (AlgorithmFailed, InvalidInput) as exc:
            if self._stop.is_set():
                raise _Stopping() from exc
            reason = self._relative(claim, exc.reason)
            log.warning("job %s: failed: %s", claim.job_id, reason)
            jobs.fail(claim, cfg.outbox, reason)
            return
        finally:
            if early is not None:
                early.close(0.0)  # a failure on the way: whatever still runs is aborted (a no-op once closed)
        jobs.finish(claim, cfg.outbox, records)
        self._disk_ok()
        log.info("job %s: done in %.2f s", claim.job_id, m.timings["finished"] - m.timings["claimed"])

    def _early_send(self, claim: jobs.Claim, alg: AlgorithmConfig) -> EarlySend | None:
        """Sends to the job's destinations that start as each DICOM output is written (issue 10), if any."""
        m = claim.manifest
        if not (m.delivery.destinations and alg.outputs and self.config.dicom.enabled
                and self.config.dicom.send_early and any(i.type == "DICOM" for i in m.inputs)):
            return None
        series = next((i.meta_data.get("series_instance_uid") for i in m.inputs if i.type == "DICOM"), None)
        return EarlySend(self.config, claim.job_id,
                         {m.delivery.name_of(d): None if isinstance(d, str) else dict(d)
                          for d in m.delivery.destinations},
                         already={name: list(uids) for name, uids in m.early_sent.items()},
                         dataset=m.dataset, series_uid=series)

    def _record_early(self, claim: jobs.Claim, stored: dict[str, dict[str, str]]) -> None:
        """Write down, before the job's finish, what its destinations have stored (SOP Instance UIDs)."""
        m = claim.manifest
        work = claim.work_dir.resolve()
        recorded = {name: {uid: Path(path).resolve().relative_to(work).as_posix() for uid, path in uids.items()}
                    for name, uids in stored.items() if uids}
        if recorded and recorded != m.early_sent:
            m.early_sent = recorded
            jobs.save_running(claim)

    def _relative(self, claim: jobs.Claim, reason: str) -> str:
        """A failure's reason with the job folder's path made relative to it, and the inbox's and outbox's to
        their names: ``.../inbox/<job>/input/ct.nii.gz`` becomes ``input/ct.nii.gz``.

        The reason is what the HTTP door's status answers, and no answer holds a server path (issue 9).
        """
        for box in (self.config.inbox, self.config.outbox):
            forms = sorted({str(box), str(box.resolve())}, key=len, reverse=True)
            for form in forms:
                job = f"{form}/{claim.job_id}"
                reason = reason.replace(job + "/", "").replace(job, ".")
            for form in forms:
                reason = reason.replace(form, box.name)
        return reason

    def _execute(self, claim: jobs.Claim, alg: AlgorithmConfig, settings: dict[str, Any], *,
                 resumed: bool = False) -> tuple[list[DataObject], dict[str, float]]:
        timeout = alg.timeout or self.config.worker.job_timeout
        inputs = self._inputs(claim)
        if self._stop.is_set():
            raise _Stopping()
        if self._engine is not None:
            try:
                return self._engine.run(claim, alg, settings, inputs, timeout, self._stop, resumed=resumed)
            except PoolClosed as exc:
                raise _Stopping() from exc
        if alg.command is not None:
            return run_command(alg, claim.job_id, claim.job_dir / jobs.INPUT, claim.work_dir, settings,
                               claim.log_path, timeout, stop=self._stop, inputs=inputs)
        try:
            return run_python(self._pool, alg, claim.job_id, inputs, claim.work_dir, settings, claim.log_path,
                              timeout)
        except PoolClosed as exc:
            raise _Stopping() from exc

    def _gate(self, claim: jobs.Claim) -> None:
        """Check each DICOM input is one whole volume; fail or warn by ``dicom.incomplete``."""
        for d in claim.manifest.inputs:
            if d.type != "DICOM":
                continue
            # The DICOM node checked its series at completion; a job's inputs never change after commit.
            found = d.gate if d.gate is not None else gate.problems(claim.job_dir / d.path)
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
        return [DataObject(type=d.type, path=str(claim.job_dir / d.path), meta_data=dict(d.meta_data), id=d.id)
                for d in claim.manifest.inputs]

    def _give_back(self, claim: jobs.Claim, reason: str, *, disk_full: bool = False) -> None:
        try:
            jobs.requeue(claim, reason,
                         attempts=attempts.counted(claim.job_dir) if self._engine is not None else None)
            log.info("job %s: given back to the inbox (%s)", claim.job_id, reason)
        except Exception as exc:
            if disk_full or is_disk_full(exc):
                # job.yaml still says running: this process remembers not to count the attempt.
                self._uncounted.add(claim.job_id)
                return
            log.exception("job %s: could not give it back; the next start runs it again", claim.job_id)


def _mark_sent_early(m: jobs.JobManifest, sources: list[str], records: list[jobs.OutputRecord],
                     stored: dict[str, dict[str, str]], early: EarlySend | None) -> None:
    """Start each destination's send with the files it stored while the job ran (``sources[i]`` is where
    ``records[i]`` was written); a destination that has them all is sent at the finish."""
    when = jobs.now_iso()
    for name, state in m.sends.items():
        taken = {str(Path(p).resolve()) for p in stored.get(name, {}).values()}
        for source, record in zip(sources, records, strict=True):
            if record.path in state.files and str(Path(source).resolve()) in taken:
                state.files[record.path] = when
        if state.files and not state.missing:
            state.status, state.sent = jobs.SendStatus.SENT, when
            last = early.last_stored(name) if early is not None else 0.0
            if last and "algorithm_ended" in m.timings:
                m.timings[RESULTS_TIMING.format(name)] = last - m.timings["algorithm_ended"]

