"""What runs on a GPU node (issue 12): the worker plugin with its warm children, and one attempt as a task.

A Dask task cannot be stopped and Dask has no timeout, so the plugin owns the children: each attempt runs in
the node's warm child of its algorithm (the local child runner, with its timeout), and the service can ask
the node to kill the child of a job's attempt (``stop_attempts``, through ``Client.run``). The scheduler and
the workers unpickle these functions by name, so every node runs the same Postbox version.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed import WorkerPlugin, get_worker
from filelock import FileLock, Timeout

from . import attempts, jobs
from .config import AlgorithmConfig, Config
from .crashpoints import crash_point
from .dataobject import DataObject
from .errors import AlgorithmFailed, DiskFull
from .health import is_disk_full
from .runner import Child, ChildPool, PoolClosed, run_command, run_python, warm

log = logging.getLogger(__name__)

PLUGIN = "postbox"
#: Seconds an attempt waits for an earlier attempt of its job (one the service was told to stop) to end.
LOCK_WAIT = 30.0


@dataclass
class _Running:
    job_id: str
    attempt: Path
    child: Child | None = None
    stop: threading.Event = field(default_factory=threading.Event)  # set: told to stop (the attempt is interrupted)


class PostboxPlugin(WorkerPlugin):
    """Holds the node's warm children and the attempts running on it."""

    name = PLUGIN

    def __init__(self, config: Config) -> None:
        self.config = config
        self.node = ""
        self.pool = ChildPool(keep_warm=config.worker.keep_warm, max_jobs_per_child=config.worker.max_jobs_per_child,
                              own_group=True)
        self.running: dict[str, _Running] = {}
        self.lock = threading.Lock()
        self.warmed: dict[str, threading.Event] = {}

    def setup(self, worker: Any) -> None:
        self.node = str(worker.name)
        python = [a for a in self.config.algorithms if a.command is None]
        self.warmed = {a.name: threading.Event() for a in python}
        if self.config.worker.keep_warm:
            threading.Thread(target=self._warm, args=(python,), name="postbox-warm", daemon=True).start()
        else:
            for event in self.warmed.values():
                event.set()

    def _warm(self, algorithms: list[AlgorithmConfig]) -> None:
        for alg in algorithms:
            try:
                seconds = warm(self.pool, alg, self.config.worker.job_timeout)
                log.info("algorithm %s: warm on %s (loaded in %.2f s)", alg.name, self.node, seconds)
            except (AlgorithmFailed, PoolClosed, OSError) as exc:
                log.error("algorithm %s: could not be warmed on %s: %s", alg.name, self.node, exc)
            finally:
                self.warmed[alg.name].set()

    def teardown(self, worker: Any) -> None:
        """The worker closes (its scheduler is gone, or SIGTERM): its attempts stop and do not count."""
        with self.lock:
            for run in self.running.values():
                run.stop.set()
                attempts.interrupt(run.attempt)
        self.pool.close()

    def stop(self, job_id: str) -> int:
        """Kill the child of ``job_id``'s attempt on this node; a not yet started one never starts."""
        with self.lock:
            run = self.running.get(job_id)
            if run is None:
                return 0
            run.stop.set()
            child = run.child
            attempts.interrupt(run.attempt)
        if child is not None:
            child.signal_kill()
        return 1

    def started(self, job_id: str, child: Child | None) -> None:
        """The child that runs ``job_id``'s attempt now (None once it is out), so that a stop can kill it."""
        with self.lock:
            run = self.running.get(job_id)
            if run is None:
                return
            run.child = child
            stopped = run.stop.is_set()
        if stopped and child is not None:
            child.signal_kill()  # told to stop while it was being handed the job


def _plugin() -> PostboxPlugin:
    plugin = get_worker().plugins.get(PLUGIN)
    if not isinstance(plugin, PostboxPlugin):
        raise RuntimeError("this Dask worker has no Postbox plugin: start it with `postbox gpu-worker`")
    return plugin


def run_attempt(job_dir: str, job_id: str, alg: AlgorithmConfig, inputs: list[dict[str, Any]],
                settings: dict[str, Any], timeout: float, max_attempts: int) -> dict[str, Any]:
    """One attempt of one job, on this node: the Dask task. Returns a reply, never raises for the job's
    own trouble: ``{"ok": True, "attempt", "outputs", "files", "timings"}`` or ``{"ok": False, "error", ...}``.

    The task ends with the attempt's files on the shared filesystem; the service checks and promotes them.
    """
    plugin = _plugin()
    folder = Path(job_dir)
    inbox = folder.parent
    lock = FileLock(jobs.lock_path(inbox, f"attempt-{job_id}"), timeout=LOCK_WAIT, thread_local=False,
                    preserve_lock_file=True)
    try:
        lock.acquire()
    except Timeout:
        return {"ok": False, "retry": True, "error": "an earlier attempt of this job still runs"}
    try:
        try:
            attempt = attempts.begin(folder, plugin.node, max_attempts)
        except attempts.AttemptsUsed as exc:
            return {"ok": False, "used": exc.count, "error": attempts.used_up(exc.count)}
        except attempts.StaleAttempt as exc:
            return {"ok": False, "stale": True, "error": str(exc)}
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            return {"ok": False, "disk_full": True, "error": "no space for the attempt's folder"}
        run = _Running(job_id, attempt)
        with plugin.lock:
            plugin.running[job_id] = run
        try:
            return _run(plugin, run, alg, inputs, settings, timeout)
        finally:
            with plugin.lock:
                if plugin.running.get(job_id) is run:
                    del plugin.running[job_id]
    finally:
        lock.release()


def _run(plugin: PostboxPlugin, run: _Running, alg: AlgorithmConfig, inputs: list[dict[str, Any]],
         settings: dict[str, Any], timeout: float) -> dict[str, Any]:
    attempt, work, log_path = run.attempt, run.attempt / attempts.WORK, run.attempt / attempts.LOG
    data = [DataObject(type=d["type"], path=d["path"], meta_data=d.get("meta_data") or {}, id=d["id"])
            for d in inputs]
    warmed = plugin.warmed.get(alg.name)
    if warmed is not None:
        warmed.wait(timeout)
    crash_point("remote.before_child")
    if run.stop.is_set():
        return {"ok": False, "interrupted": True, "attempt": attempt.name, "error": "interrupted"}
    try:
        if alg.command is not None:
            outputs, timings = run_command(alg, run.job_id, attempt.parent.parent / jobs.INPUT, work, settings,
                                           log_path, timeout, stop=run.stop, inputs=data)
        else:
            outputs, timings = run_python(plugin.pool, alg, run.job_id, data, work, settings, log_path, timeout,
                                          started=lambda child: plugin.started(run.job_id, child))
    except (AlgorithmFailed, DiskFull, PoolClosed, OSError) as exc:
        if run.stop.is_set() or isinstance(exc, PoolClosed):
            attempts.interrupt(attempt)
            return {"ok": False, "interrupted": True, "attempt": attempt.name, "error": "interrupted"}
        full = isinstance(exc, DiskFull) or is_disk_full(exc)
        if full:
            # A full disk is no fault of the job: the attempt does not count, and its partial files give back
            # the space the service needs to give the job back.
            shutil.rmtree(work, ignore_errors=True)
            attempts.interrupt(attempt)
        reason = exc.reason if isinstance(exc, AlgorithmFailed) else str(exc)
        return {"ok": False, "disk_full": full, "attempt": attempt.name, "error": reason}
    crash_point("remote.outputs_written")
    plain = [{"type": o.type, "path": o.path, "meta_data": o.meta_data, "id": o.id,
              "parent": o.parent.id if o.parent is not None else None} for o in outputs]
    try:
        manifest = attempts.describe(attempt, plain)
    except attempts.AttemptMismatch as exc:
        return {"ok": False, "attempt": attempt.name, "error": str(exc)}
    crash_point("remote.before_return")
    return {"ok": True, **manifest, "timings": timings, "node": plugin.node, "pid": os.getpid()}


def stop_attempts(job_ids: list[str], dask_worker: Any = None) -> int:
    """Run on every node by the service (``Client.run``): stop the attempts of ``job_ids`` here, if any run."""
    plugin = (dask_worker or get_worker()).plugins.get(PLUGIN)
    return sum(plugin.stop(job_id) for job_id in job_ids) if isinstance(plugin, PostboxPlugin) else 0


def running_jobs(dask_worker: Any = None) -> list[str]:
    """Run on every node by ``postbox cluster status``: the jobs whose attempts run here now."""
    plugin = (dask_worker or get_worker()).plugins.get(PLUGIN)
    if not isinstance(plugin, PostboxPlugin):
        return []
    with plugin.lock:
        return sorted(plugin.running)
