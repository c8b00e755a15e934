"""Runs of datasets: a trigger makes a job like any door's, its status is read from its folder, its outputs
are recorded as the dataset's data objects once it is done.

A run is a job staged and committed by :func:`pipeline.jobs.submit` (``source: http``), its inputs
hard-linked from the dataset's folder; ``job.yaml`` names its owner ``key-<id>`` (:attr:`ApiKey.tag`). Its
outputs are read from its folder in the outbox (the folders are the truth) and recorded once, when first
seen, so they keep stable ids.

A status request may wait for its job (issue 10): PlatiPy's client polls once right after the trigger, then
sleeps a fixed second, so an answer that holds a PENDING or RUNNING state until the job ends, or
``http.status_wait_ms`` pass, saves its user that second. The worker of this service wakes the waiters as it
finishes a job (:meth:`Runs.job_finished`); a job another service on the same inbox finishes, or one that
fails (the worker tells only of jobs done), is seen by reading it again every ``RECHECK_SECONDS``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline import jobs
from pipeline.algorithms import merge_settings, resolve
from pipeline.checks import json_object
from pipeline.config import Config
from pipeline.errors import DamagedManifest, InvalidInput
from pipeline.index import ApiKey, Index

from ._paths import hide_paths
from .errors import NotFound
from .records import Records, record_id

log = logging.getLogger(__name__)

__all__ = ["RECHECK_SECONDS", "Runs"]

# How often a waiting status request reads its job again: the wake-up covers only jobs this service's worker
# finishes well; a failure, or a job another service on the same inbox finishes, is seen by reading again.
RECHECK_SECONDS = 0.15
_UNDERWAY = ("PENDING", "RUNNING")


def may_see_job(key: ApiKey, manifest: jobs.JobManifest) -> bool:
    """Whether ``key`` may read a job: a site key any, a plain key those it started.

    A job started by release 0.1 names its owner by the key's name: it is the key's only if that key was
    made by that release, before the job (a key made since under the same name never takes it over). The
    time check also keeps a 0.1 key once *named* ``key-7`` from passing for the key whose id is 7.
    """
    if key.site:
        return True
    if manifest.created < key.created:
        return False
    return manifest.owner == key.tag or (key.legacy and manifest.owner == key.name)


class Runs:
    """Trigger, status and output recording of the HTTP door's datasets."""

    def __init__(self, config: Config, index: Index, records: Records) -> None:
        self.config = config
        self.index = index
        self.records = records
        # Each waiting status request holds a server thread: at most max_waiters, and never every thread.
        self.max_waiters = min(config.http.max_waiters, config.http.threads - 1)
        self._finished = threading.Condition()  # notified each time this service's worker finishes a job
        self._generation = 0  # jobs finished so far, under _finished: a waiter that sees it change looks again
        self._waiters = 0
        self._closed = False

    def trigger(self, key: ApiKey, fields: Mapping[str, str], sender: dict[str, Any]) -> str:
        """Turn one of the key's datasets into a job in the inbox (the same stage-then-rename as every door)."""
        for name in ("dataset", "algorithm"):
            if fields.get(name) in (None, ""):
                raise InvalidInput(f"the field '{name}' is missing")
        alg = resolve(self.config, fields["algorithm"])  # UnknownAlgorithm: 404, as PlatiPy answers
        ds = self.records.dataset(key, fields["dataset"], write=True)
        settings: dict[str, Any] = {}
        if fields.get("config") not in (None, ""):
            settings = json_object(fields["config"], "config", holding="the algorithm's settings")
        merge_settings(alg, settings)  # other keys or types: InvalidInput at the door, not a failed job
        inputs = self.index.find("dataobjects", dataset=ds["id"], is_input=True)
        if not inputs:
            raise InvalidInput(f"dataset {ds['id']} has no data objects; add one before running it")
        waiting = [o["id"] for o in inputs if not o["is_fetched"]]
        if waiting:
            raise InvalidInput(f"dataset {ds['id']} is not ready: data object(s) {waiting} have not arrived "
                               "(GET /api/dataset/ready/<id> says when they have)")
        folders = [self.records.root / str(ds["id"]) / o["folder"] for o in inputs]
        delivery = jobs.Delivery()
        if ds.get("to_dicom_location") is not None:
            loc = self.records.location(key, ds["to_dicom_location"])
            self.records.check_host(loc["host"])  # the operator may have taken it off the list since
            # The DICOM outputs go back by C-STORE, like a routed DICOM job's (the sender retries).
            delivery.destinations.append({"host": loc["host"], "port": loc["port"],
                                          "ae_title": loc["ae_title"] or "ANY-SCP"})
        manifest = jobs.submit(self.config.inbox, folders, algorithm=alg.name, settings=settings, source="http",
                               how="link", index=self.index, dataset=str(ds["id"]), owner=key.tag, sender=sender,
                               delivery=delivery)
        self.records.touch(ds, last_job=manifest.id)
        log.info("dataset %d: job %s triggered (%s)", ds["id"], manifest.id, alg.name)
        return manifest.id

    def status(self, key: ApiKey, job_id: str, *, wait: float = 0.0) -> dict[str, Any]:
        """PlatiPy's task status of a job the key may see; a failure's error never names a server path.

        Parameters
        ----------
        key
            The request's key.
        job_id
            The job, from the trigger's poll URL.
        wait
            Seconds a PENDING or RUNNING answer may be held for the job to end: the answer comes as soon as it
            does. It is given at once when ``max_waiters`` requests wait already, or the door is stopping.

        Raises
        ------
        NotFound
            No such job, or not the key's.
        """
        with self._finished:
            seen = self._generation  # before the read: a job finished after it changes the generation
        answer = self._read_status(key, job_id)
        if wait <= 0 or answer["state"] not in _UNDERWAY or not self._take_slot():
            return answer
        try:
            deadline = time.monotonic() + wait
            while answer["state"] in _UNDERWAY and (left := deadline - time.monotonic()) > 0:
                with self._finished:
                    if self._generation == seen and not self._closed:  # else a job ended since: read again
                        self._finished.wait(min(left, RECHECK_SECONDS))
                    seen, closed = self._generation, self._closed
                answer = self._read_status(key, job_id)
                if closed:
                    break
        finally:
            with self._finished:
                self._waiters -= 1
        return answer

    @property
    def waiting(self) -> int:
        """How many status requests wait for their job now."""
        with self._finished:
            return self._waiters

    def _take_slot(self) -> bool:
        """Count one more waiting request, if fewer than ``max_waiters`` wait and the door is not stopping."""
        with self._finished:
            if self._closed or self._waiters >= self.max_waiters:
                return False
            self._waiters += 1
            return True

    def close(self) -> None:
        """The door is stopping: waiting status requests answer now, and new ones at once."""
        with self._finished:
            self._closed = True
            self._finished.notify_all()

    def _read_status(self, key: ApiKey, job_id: str) -> dict[str, Any]:
        for _ in range(3):  # the job may move to the outbox while it is looked for or read: look again
            job_dir = jobs.locate(self.config.inbox, self.config.outbox, job_id)
            if job_dir is None:
                continue
            try:
                manifest = jobs.read_manifest(job_dir)
            except (FileNotFoundError, DamagedManifest):  # moved, or being set aside: look again
                continue
            if not may_see_job(key, manifest):
                break
            done = job_dir.parent == self.config.outbox
            if done and manifest.status == jobs.JobStatus.DONE:
                return {"state": "SUCCESS", "current": 1, "total": 1, "status": "Done", "job": job_id}
            if done:
                return {"state": "FAILURE", "current": 1, "total": 1,
                        "status": hide_paths(manifest.error or "failed", self.config), "job": job_id}
            if manifest.status == jobs.JobStatus.PENDING:
                return {"state": "PENDING", "current": 0, "total": 1, "status": "Pending...", "job": job_id}
            return {"state": "RUNNING", "current": 0, "total": 1,
                    "status": f"Running Algorithm: {manifest.algorithm}", "job": job_id}
        raise NotFound(f"job {job_id}")

    def job_finished(self, manifest: jobs.JobManifest) -> None:
        """The worker's hook: record a dataset run's outputs now, off the client's next request, then wake
        the status requests waiting (outputs first, so that the client's next read lists them)."""
        try:
            if manifest.dataset is None or manifest.status != jobs.JobStatus.DONE:
                return
            found = self.index.find("datasets", id=record_id(manifest.dataset, "dataset"))
            if found and found[0].get("last_job") == manifest.id:
                self.record_outputs(found[0], self.index.find("dataobjects", dataset=found[0]["id"]), manifest)
        finally:
            with self._finished:
                self._generation += 1
                self._finished.notify_all()

    def record_outputs(self, ds: dict[str, Any], objects: list[dict[str, Any]],
                       manifest: jobs.JobManifest | None = None) -> list[dict[str, Any]]:
        """The outputs of the dataset's latest run, recorded when first seen once it is done (stable ids).

        ``objects`` are the dataset's records as read; returns the output records added to them. Outputs
        are owned by the dataset's owner.
        """
        job_id = ds.get("last_job")
        if not job_id or any(o.get("job") == job_id for o in objects):
            return []
        if manifest is None:  # the worker's hook passes the manifest it just wrote; a request reads it
            try:
                manifest = jobs.read_manifest(self.config.outbox / job_id)
            except (FileNotFoundError, DamagedManifest):
                return []  # not finished yet, or set aside
        if manifest.status != jobs.JobStatus.DONE or not manifest.outputs:
            return []
        parents = _input_objects([o for o in objects if o["is_input"]], manifest)
        records = []
        for out in manifest.outputs:
            meta = dict(out.meta_data)
            records.append({
                "dataset": ds["id"], "owner": ds["owner"], "is_input": False, "type": out.type,
                "job": job_id, "output": out.path, "file_name": Path(out.path).name,
                "parent": parents.get(out.parent or ""), "meta_data": meta, "timestamp": manifest.finished,
                "is_fetched": False, "is_sent": False, "status": None,
                "series_instance_uid": meta.get("series_instance_uid"), "folder": None,
            })
        # Two requests may see the run done at once: ``unless`` records each output once, with one id.
        ids = self.index.insert_many("dataobjects", records, id_field="id",
                                     unless=[{"job": job_id, "output": r["output"]} for r in records])
        return [{**r, "id": i} for r, i in zip(records, ids, strict=True)]

    def sent(self, job_id: str | None) -> bool:
        """Whether a job's DICOM outputs have reached every destination (the sender's state in job.yaml)."""
        if not job_id:
            return False
        try:
            sends = jobs.read_manifest(self.config.outbox / job_id).sends
        except (FileNotFoundError, DamagedManifest):
            return False
        return bool(sends) and all(s.status == jobs.SendStatus.SENT for s in sends.values())


def _input_objects(inputs: list[dict[str, Any]], manifest: jobs.JobManifest) -> dict[str, int]:
    """Which data object each of a job's inputs came from: by folder for files, by series for DICOM."""
    by_folder = {o["folder"]: o["id"] for o in inputs if o.get("folder")}
    by_series = {o["series_instance_uid"]: o["id"] for o in inputs if o.get("series_instance_uid")}
    result: dict[str, int] = {}
    for item in manifest.inputs:
        parts = Path(item.path).parts
        uid = item.meta_data.get("series_instance_uid")
        if uid in by_series:
            result[item.id] = by_series[uid]
        elif len(parts) > 1 and parts[1] in by_folder:
            result[item.id] = by_folder[parts[1]]
    return result
