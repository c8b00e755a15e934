"""Run attempts on the GPU nodes of a Dask cluster (issue 12, ``engine.kind: dask``); the folders stay the truth.

The worker claims a job by its file lock as always and holds it for the whole remote run; this engine only
places the attempt: one Dask task per attempt (``remote.run_attempt``), submitted while the jobs in flight are
fewer than the cluster's free slots, so no job waits in a node's queue where a lost node would take it down.
What Dask cannot do, the engine does: a deadline of its own (``job_timeout`` + ``engine.dask.grace``), a stop
that kills the remote child, a reconnect with backoff when the scheduler is lost (the lock is kept, the
attempt submitted again), and the count of attempts from the job's ``attempts/`` folders.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distributed import Client, KilledWorker
from distributed.security import Security

from . import attempts, jobs, remote
from .config import AlgorithmConfig, Config
from .crashpoints import crash_point
from .dataobject import DataObject
from .errors import AlgorithmFailed, DiskFull
from .health import SCHEDULER_LOST, Health
from .runner import PoolClosed

log = logging.getLogger(__name__)

#: Where the drain state lives on the scheduler (``Client.set_metadata``), so every service sees it.
DRAINED = ("postbox", "drained")
#: Seconds a call to the scheduler may take before the engine treats it as lost.
CALL_TIMEOUT = 10.0


def security(config: Config) -> Security | None:
    """The TLS of the engine's connections (``engine.dask.tls``), or None for a loopback ``tcp://``."""
    dcfg = config.engine.dask
    if not dcfg.security or dcfg.tls is None:
        return None
    files = dcfg.tls.files(config.base_dir)
    return Security(tls_ca_file=str(files.ca) if files.ca else None, tls_client_cert=str(files.cert),
                    tls_client_key=str(files.key), tls_worker_cert=str(files.cert), tls_worker_key=str(files.key),
                    tls_scheduler_cert=str(files.cert), tls_scheduler_key=str(files.key), require_encryption=True)


def connect(config: Config, *, timeout: float = CALL_TIMEOUT) -> Client:
    """A client of the configured scheduler (OSError or TimeoutError if it cannot be reached)."""
    name = f"postbox-{socket.gethostname()}-{os.getpid()}"
    return Client(config.engine.dask.scheduler, security=security(config), timeout=timeout,
                  set_as_default=False, name=name)


def slots_of(resources: Mapping[str, float], needs: Mapping[str, float]) -> int:
    """How many attempts needing ``needs`` fit on a worker that has ``resources`` at once."""
    if not needs:
        return 1
    return min(math.floor(resources.get(name, 0) / amount) for name, amount in needs.items())


def named_by(worker: Mapping[str, Any], names: list[str]) -> bool:
    """Whether one of ``names`` (the drain list, a command's NODE) names the worker: its name, address or host."""
    address = str(worker.get("id") or worker.get("address") or "")
    host = address.split("://")[-1].rsplit(":", 1)[0]
    return bool({str(worker.get("name")), address, host} & set(names))


def _exception(future: Any) -> BaseException | None:
    """A failed future's exception, or None when it cannot be had (it went with the scheduler)."""
    try:
        return future.exception(timeout=CALL_TIMEOUT)
    except Exception:
        return None


class DaskEngine:
    """The service's side of a Dask cluster: one client, a watch on its workers, and the attempts in flight."""

    def __init__(self, config: Config, wake: threading.Event, health: Health | None = None) -> None:
        self.config = config
        self.wake = wake
        self.health = health or Health()
        self._client: Client | None = None
        self._slots = 0
        self._workers: dict[str, dict[str, Any]] = {}  # address -> scheduler's info, drained excluded
        self._drained: list[str] = []
        self._connected = threading.Event()
        self._closed = threading.Event()
        self._refresh_now = threading.Event()
        self._lock = threading.Lock()
        self._in_flight: dict[str, tuple[Any, threading.Event]] = {}  # job id -> (future, its done event)
        self._thread: threading.Thread | None = None
        self._said_down = False
        # Counts losses of the scheduler (and its restarts, seen as a new scheduler id): an attempt submitted
        # in an earlier epoch is gone with the scheduler that had it, whatever its future still says.
        self._epoch = 0
        self._scheduler_id: str | None = None

    # -- the watch --

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="dask-engine", daemon=True)
        self._thread.start()

    def slots(self) -> int:
        """Attempts the cluster can run at once now (``engine.dask.slots``, or summed over the workers that are
        not drained); 0 while the scheduler is out of reach."""
        if not self._connected.is_set():
            return 0
        configured = self.config.engine.dask.slots
        return self._slots if configured == "auto" else min(int(configured), self._slots)

    def _watch(self) -> None:
        backoff = 0.0
        dcfg = self.config.engine.dask
        while not self._closed.is_set():
            try:
                client = self._client_now()
                info = client.scheduler_info(n_workers=-1)
                drained = list(client.get_metadata(list(DRAINED), default=[]))
            except Exception as exc:  # the scheduler is out of reach: no attempt is placed until it is back
                self._lost(exc)
                backoff = min(dcfg.reconnect_max, backoff * 2 if backoff else 0.2)
                self._closed.wait(backoff)
                continue
            backoff = 0.0
            if not self._connected.is_set():
                if self._said_down:
                    log.info("dask: the scheduler is back")
                self._said_down = False
                self._connected.set()
                self.health.clear(SCHEDULER_LOST)
            if info.get("id") != self._scheduler_id:
                if self._scheduler_id is not None:
                    self._new_epoch()  # a restarted scheduler, met again before its loss was seen
                self._scheduler_id = info.get("id")
            needs = dict(dcfg.resources)
            workers = {a: w for a, w in info.get("workers", {}).items() if not named_by(w, drained)}
            slots = sum(slots_of(w.get("resources") or {}, needs) for w in workers.values())
            with self._lock:
                changed = slots != self._slots
                self._slots, self._workers, self._drained = slots, workers, drained
            if changed:
                log.info("dask: %d slot(s) on %d worker(s)%s", slots, len(workers),
                         f", {len(drained)} drained" if drained else "")
                self.wake.set()
            self._refresh_now.wait(dcfg.refresh_seconds)
            self._refresh_now.clear()

    def _client_now(self) -> Client:
        client = self._client
        if client is not None and client.status == "running":
            return client
        if client is not None and client.status in ("connecting", "newly-created"):
            raise ConnectionError("reconnecting to the scheduler")
        if client is not None:
            try:
                client.close(timeout=2)
            except Exception:
                pass
        self._client = connect(self.config)
        log.info("dask: connected to the scheduler")
        return self._client

    def _lost(self, exc: BaseException) -> None:
        if self._connected.is_set() or not self._said_down:
            log.warning("dask: the scheduler is out of reach (%s); jobs wait, trying again with backoff",
                        type(exc).__name__)
            self._said_down = True
        self.health.report(SCHEDULER_LOST, "jobs wait in the inbox; running ones keep their lock and are submitted "
                                           "again when it is back")
        self._connected.clear()
        with self._lock:
            self._slots = 0
        self._new_epoch()

    def _new_epoch(self) -> None:
        with self._lock:
            self._epoch += 1
            for _future, done in self._in_flight.values():
                done.set()  # their run() notices the loss and submits again once connected

    # -- one attempt --

    def run(self, claim: jobs.Claim, alg: AlgorithmConfig, settings: dict[str, Any], inputs: list[DataObject],
            timeout: float, stop: threading.Event, *,
            resumed: bool = False) -> tuple[list[DataObject], dict[str, float]]:
        """Run one job on the cluster until it ends; returns its outputs (promoted into the job's ``work/``) and
        timings. AlgorithmFailed for the job's failure, DiskFull, PoolClosed when the service stops.

        ``resumed``: the job was running when it was claimed (its service died), so an attempt of it may still run.
        """
        job_id = claim.job_id
        args = (str(claim.job_dir.resolve()), job_id, alg,
                [{"type": d.type, "path": str(Path(d.path).resolve()), "meta_data": d.meta_data, "id": d.id}
                 for d in inputs], settings, timeout, self.config.worker.max_attempts)
        if resumed or attempts.folders(claim.job_dir):
            # An attempt from an earlier life of a service may still run: it stops before ours starts. (Not for
            # every job: the call goes to every node.)
            self._stop_remote(job_id)
        try:
            while True:
                reply = self._attempt(claim, args, alg, stop, timeout)
                if reply is None:
                    continue
                done = self._finish(claim, reply, inputs)
                if done is not None:
                    return done
                if reply.get("interrupted") and stop.is_set():
                    raise PoolClosed("the worker is stopping")
                stop.wait(0.5)  # not a wait for a result: an earlier attempt of the job is still ending
        finally:
            claim.manifest.attempts = attempts.counted(claim.job_dir)

    def _attempt(self, claim: jobs.Claim, args: tuple[Any, ...], alg: AlgorithmConfig, stop: threading.Event,
                 timeout: float) -> dict[str, Any] | None:
        """Submit once and wait; None when it must be submitted again (the scheduler was lost).

        The deadline starts at the submission: while the scheduler is out of reach the job keeps its lock and
        waits, its time not counted.
        """
        job_id = claim.job_id
        client = self._wait_connected(stop)
        deadline = time.monotonic() + timeout + self.config.engine.dask.grace
        with self._lock:
            workers = list(self._workers) if self._drained else None
            epoch = self._epoch
        done = threading.Event()
        try:
            future = client.submit(remote.run_attempt, *args, key=f"postbox-{job_id}-{uuid.uuid4().hex[:8]}",
                                   resources=self.config.resources(alg), workers=workers, pure=False, retries=0)
        except Exception as exc:
            self._lost(exc)
            return None
        future.add_done_callback(lambda _f: done.set())
        with self._lock:
            self._in_flight[job_id] = (future, done)
        try:
            while not done.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
                if stop.is_set():
                    break
                if time.monotonic() >= deadline:
                    self._stop_remote(job_id)
                    future.cancel()
                    raise AlgorithmFailed(job_id, f"timed out after {timeout:g} s (worker.job_timeout, plus "
                                                  "engine.dask.grace for its GPU node to answer); its remote process "
                                                  "was killed")
                if client.status != "running" or self._epoch != epoch:
                    break
            if stop.is_set():
                self._stop_remote(job_id)
                future.cancel()
                raise PoolClosed("the worker is stopping")
            status = future.status
            if status == "finished":
                try:
                    return dict(future.result(timeout=CALL_TIMEOUT))
                except Exception:
                    status = "lost"  # finished, but its answer went with the scheduler: the attempt runs again
            error = _exception(future) if status == "error" else None
            if isinstance(error, KilledWorker):
                raise AlgorithmFailed(job_id, attempts.used_up(attempts.counted(claim.job_dir)))
            if error is not None:
                raise AlgorithmFailed(job_id, f"its attempt failed on the GPU node: {type(error).__name__}: {error}")
            # Cancelled or lost with the scheduler: keep the lock, submit again once it is back.
            log.warning("job %s: its attempt was lost with the scheduler; it is submitted again", job_id)
            return None
        finally:
            with self._lock:
                if self._in_flight.get(job_id, (None,))[0] is future:
                    del self._in_flight[job_id]
            future.release()

    def _wait_connected(self, stop: threading.Event) -> Client:
        while True:
            client = self._client
            if self._connected.is_set() and client is not None and client.status == "running":
                return client
            if stop.is_set():
                raise PoolClosed("the worker is stopping")
            self._refresh_now.set()
            stop.wait(0.2)  # not a wait for a result: the watch thread reconnects meanwhile

    def _finish(self, claim: jobs.Claim, reply: dict[str, Any],
                inputs: list[DataObject]) -> tuple[list[DataObject], dict[str, float]] | None:
        job_id = claim.job_id
        if reply.get("ok"):
            folder = claim.job_dir / attempts.ATTEMPTS / reply["attempt"]
            try:
                attempts.verify(folder, reply)
            except attempts.AttemptMismatch as exc:
                raise AlgorithmFailed(job_id, str(exc)) from None
            work = attempts.promote(claim.job_dir, folder, claim.log_path)
            crash_point("attempt.promoted")
            by_id = {d.id: d for d in inputs}
            outputs = [DataObject(type=o["type"], path=str(work / o["path"]), meta_data=o.get("meta_data") or {},
                                  id=o.get("id"), parent=by_id.get(o.get("parent"))) for o in reply["outputs"]]
            timings = dict(reply["timings"])
            for other in attempts.folders(claim.job_dir):
                note = f"attempt {other.name} did not finish (its GPU node's worker process died); run again"
                if other.name != folder.name and not (other / attempts.INTERRUPTED).exists() \
                        and note not in claim.manifest.warnings:
                    claim.manifest.warnings.append(note)
            log.info("job %s: attempt %s ran on %s", job_id, reply["attempt"], reply.get("node"))
            return outputs, timings
        folder_name = reply.get("attempt")
        if folder_name:
            attempts.append_log(claim.job_dir / attempts.ATTEMPTS / folder_name, claim.log_path)
        if reply.get("disk_full"):
            raise DiskFull(f"the algorithm of job {job_id} on its GPU node: {reply.get('error')}")
        if reply.get("retry") or reply.get("interrupted"):
            return None
        raise AlgorithmFailed(job_id, str(reply.get("error") or "the attempt failed on its GPU node"))

    # -- stopping --

    def _stop_remote(self, *job_ids: str, wait: float = CALL_TIMEOUT) -> None:
        """Kill the attempts of ``job_ids`` on whichever nodes run them (their children's process groups).

        Waits at most ``wait`` seconds: a hung node never answers, and must not hold the job that gives up on it (the
        other nodes have been told meanwhile; the hung one's attempt can only end in its own folder).
        """
        client = self._client
        if not job_ids or client is None or client.status != "running":
            return
        try:
            client.run(remote.stop_attempts, list(job_ids), on_error="ignore", callback_timeout=wait)
        except Exception as exc:
            log.warning("jobs %s: not every GPU node answered the stop of their attempts (%s)", ", ".join(job_ids),
                        type(exc).__name__)

    def stop(self) -> None:
        """The service stops: every remote attempt is killed and counts as interrupted; runs give their jobs back."""
        with self._lock:
            running = list(self._in_flight)
            events = [done for _f, done in self._in_flight.values()]
        self._stop_remote(*running, wait=min(CALL_TIMEOUT, self.config.worker.stop_timeout / 2))
        for done in events:
            done.set()

    def close(self) -> None:
        self._closed.set()
        self._refresh_now.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close(timeout=5)
            except Exception:
                pass
