"""Datasets, data objects and DICOM locations of the HTTP door: records in the index, files beside the inbox.

A dataset is PlatiPy's unit of work: a client creates it, uploads inputs into it, triggers a run and
downloads the outputs. Its records live in the index (tables ``datasets``, ``dataobjects``,
``locations``), each carrying its owner's key *name*; its uploads live in ``<inbox>/.datasets/<id>/``, on
the inbox's filesystem, so a trigger hard-links them into a job staged and committed by
:func:`pipeline.jobs.submit` like any other. A run's outputs are read from its job folder in the outbox
(the folders are the truth) and recorded once, when first seen, so they keep stable ids.

Layout::

    <inbox>/.datasets/<id>/<object>/<file name>   a FILE input
    <inbox>/.datasets/<id>/<object>/*.dcm         a DICOM input (one series)
    <inbox>/.datasets/.uploads/<token>/           a request body being received (removed when answered)
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline import jobs
from pipeline.algorithms import merge_settings, resolve
from pipeline.config import Config, Destination
from pipeline.errors import DamagedManifest, InvalidInput, PostboxError
from pipeline.index import Index

from .uploads import Upload, safe_name, unpack_dicom_zip

log = logging.getLogger(__name__)

__all__ = ["DATASETS", "Datasets", "NotFound"]

DATASETS = ".datasets"
# Owner of the datasets that show jobs of the doors without keys (folder drop, DICOM, CLI): every key sees
# them, so a DICOM-fed job is listed and downloadable over HTTP like any other (issue 4), but none may add
# to them or run them.
SITE = "*"
UPLOADS = ".uploads"
DEFAULT_TIMEOUT_HOURS = 24.0
RETRIEVE = ("SEND", "MOVE", "GET")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_LEFTOVER_SECONDS = 3600.0  # an upload folder or dataset folder untouched this long has no request behind it


class NotFound(PostboxError):
    """A dataset, data object, job or location this key does not own (or that does not exist): HTTP 404."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} not found")
        self.what = what

    def __reduce__(self):  # keep fields across process boundaries
        return (type(self), (self.what,))


def _number(value: Any, what: str) -> int:
    """A record id from a form field or a path segment."""
    try:
        number = int(str(value).strip())
    except ValueError:
        raise InvalidInput(f"{what} must be a whole number (an id), not {value!r}") from None
    return number


def _iso(epoch: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="milliseconds")


class Datasets:
    """The HTTP door's records and folders over one inbox and index; every method checks the owner."""

    def __init__(self, config: Config, index: Index) -> None:
        self.config = config
        self.index = index
        self.root = config.inbox / DATASETS
        self.uploads = self.root / UPLOADS
        self.uploads.mkdir(parents=True, exist_ok=True)

    # -- datasets ------------------------------------------------------------------------------

    def create(self, owner: str, fields: Mapping[str, str]) -> dict[str, Any]:
        """A new, empty dataset; ``timeout`` is in hours (default 24), locations are ids this key owns."""
        hours = DEFAULT_TIMEOUT_HOURS
        if fields.get("timeout") not in (None, ""):
            try:
                hours = float(fields["timeout"])
            except ValueError:
                raise InvalidInput(f"timeout must be a number of hours, not {fields['timeout']!r}") from None
            if not 0 < hours <= 24 * 366:
                raise InvalidInput(f"timeout must be more than 0 and at most a year in hours, not {hours:g}")
        locations = {}
        for key in ("from_dicom_location", "to_dicom_location"):
            if fields.get(key) not in (None, ""):
                locations[key] = self.location(owner, _number(fields[key], key))["id"]
        now = time.time()
        record = {"owner": owner, "timestamp": jobs.now_iso(), "timeout_hours": hours, "expires": now + hours * 3600,
                  "from_dicom_location": locations.get("from_dicom_location"),
                  "to_dicom_location": locations.get("to_dicom_location"), "last_job": None}
        ds_id = self.index.insert("datasets", record, id_field="id")
        (self.root / str(ds_id)).mkdir(parents=True, exist_ok=True)
        log.info("dataset %d: created for key '%s' (kept %g h)", ds_id, owner, hours)
        return {**record, "id": ds_id}

    def get(self, owner: str, dataset_id: Any, *, shared: bool = True) -> dict[str, Any]:
        """The dataset record, NotFound unless this key owns it (or, with ``shared``, it is the site's)."""
        number = _number(dataset_id, "dataset")
        found = self.index.find("datasets", id=number, owner=owner)
        if not found and shared:
            found = self.index.find("datasets", id=number, owner=SITE)
        if not found:
            raise NotFound(f"dataset {dataset_id}")
        return found[0]

    def _adopt_site_jobs(self) -> None:
        """Give each of the latest finished jobs of the keyless doors a dataset of its own, once (stable ids).

        Only the latest ``http.site_jobs``: an outbox of 10,000 DICOM jobs must not turn one listing into
        10,000 records; older jobs keep the datasets they got while they were recent.
        """
        limit = self.config.http.site_jobs
        if limit == 0:
            return
        recent = self.index.jobs(lambda r: r.get("owner") is None and r.get("location") == "outbox")[-limit:]
        known = {d.get("last_job") for d in self.index.find("datasets", owner=SITE)}
        # Kept as long as its job (expires 9999-12-31): the outbox's retention decides, not a timeout.
        records = [{"owner": SITE, "timestamp": rec["created"], "timeout_hours": 0.0, "expires": 253402300799.0,
                    "from_dicom_location": None, "to_dicom_location": None, "last_job": rec["id"],
                    "source": rec["source"]} for rec in recent if rec["id"] not in known]
        if records:
            self.index.insert_many("datasets", records, id_field="id",
                                   unless=[{"owner": SITE, "last_job": r["last_job"]} for r in records])

    def describe(self, record: dict[str, Any]) -> dict[str, Any]:
        """The dataset as the API shows it (PlatiPy's fields; never the owner's key or a server path)."""
        objects = self.index.find("dataobjects", dataset=record["id"])
        objects += self._record_outputs(record, objects)
        outputs = [o for o in objects if not o["is_input"] and o.get("job") == record.get("last_job")]
        children: dict[int, list[dict[str, Any]]] = {}
        for o in outputs:
            if o.get("parent") is not None:
                children.setdefault(o["parent"], []).append(self._object_json(o, []))
        locations = {k: self._location_or_none(record["owner"], record.get(k))
                     for k in ("from_dicom_location", "to_dicom_location")}
        # Only a dataset with a location to send to (or a routed DICOM job) has sends to read.
        sendable = record.get("to_dicom_location") is not None or record["owner"] == SITE
        sent = sendable and self._sent(record.get("last_job"))
        return {
            "id": record["id"],
            "input_data_objects": [self._object_json(o, children.get(o["id"], [])) for o in objects if o["is_input"]],
            "output_data_objects": [self._object_json({**o, "is_sent": sent and o["type"] == "DICOM"}, [])
                                    for o in outputs],
            "from_dicom_location": locations["from_dicom_location"],
            "from_dicom_location_id": record.get("from_dicom_location"),
            "to_dicom_location": locations["to_dicom_location"],
            "to_dicom_location_id": record.get("to_dicom_location"),
            "timestamp": record["timestamp"],
            "timeout": _iso(record["expires"]),
            "last_job": record.get("last_job"),
        }

    def _sent(self, job_id: str | None) -> bool:
        """Whether a job's DICOM outputs have reached every destination (the sender's state in job.yaml)."""
        if not job_id:
            return False
        try:
            sends = jobs.read_manifest(self.config.outbox / job_id).sends
        except (FileNotFoundError, DamagedManifest):
            return False
        return bool(sends) and all(s.status == jobs.SendStatus.SENT for s in sends.values())

    def owned(self, owner: str) -> list[dict[str, Any]]:
        """This key's datasets, then the site's (jobs from the folder, DICOM and CLI doors)."""
        self._adopt_site_jobs()
        limit = self.config.http.site_jobs
        site = sorted(self.index.find("datasets", owner=SITE), key=lambda r: r["last_job"])[-limit:] if limit else []
        return [self.describe(r) for r in self.index.find("datasets", owner=owner) + site]

    def ready(self, record: dict[str, Any]) -> bool:
        """True once the dataset has inputs and every one of them has arrived (PlatiPy's meaning)."""
        inputs = self.index.find("dataobjects", dataset=record["id"], is_input=True)
        return bool(inputs) and all(o["is_fetched"] for o in inputs)

    def _touch(self, record: dict[str, Any], **fields: Any) -> None:
        """Record a run of a dataset: its timeout counts again from now."""
        self.index.update("datasets", {**fields, "expires": time.time() + record["timeout_hours"] * 3600},
                          id=record["id"])

    # -- data objects ---------------------------------------------------------------------------

    def add_object(self, owner: str, fields: Mapping[str, str], upload: Upload | None, work: Path) -> dict[str, Any]:
        """Add an input data object to a dataset from a request's fields and (optionally) its file.

        ``work`` is the request's private folder under ``.datasets/.uploads``; what is kept is renamed
        from there into the dataset's folder, and the record is written last, so a refusal at any step
        leaves neither a file nor a record.
        """
        if fields.get("dataset") in (None, ""):
            raise InvalidInput("the field 'dataset' (the dataset id) is missing")
        ds = self.get(owner, fields["dataset"], shared=False)
        has_file = upload is not None and upload.path is not None
        kind = (fields.get("type") or ("FILE" if has_file else "")).upper()
        if kind not in ("FILE", "DICOM"):
            raise InvalidInput(f"type must be FILE or DICOM, not {fields.get('type')!r}")
        meta: dict[str, Any] = {}
        if fields.get("meta_data") not in (None, ""):
            try:
                meta = json.loads(fields["meta_data"])
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"meta_data is not JSON: {exc}") from None
            if not isinstance(meta, dict):
                raise InvalidInput("meta_data must be a JSON object")
        parent = None
        if fields.get("parent") not in (None, ""):
            found = self.index.find("dataobjects", id=_number(fields["parent"], "parent"), dataset=ds["id"])
            if not found:
                raise NotFound(f"parent data object {fields['parent']} in dataset {ds['id']}")
            parent = found[0]["id"]
        record: dict[str, Any] = {
            "dataset": ds["id"], "owner": owner, "is_input": True, "type": kind, "meta_data": meta,
            "parent": parent, "timestamp": jobs.now_iso(), "is_sent": False, "status": None,
            "series_instance_uid": None, "dicom_retrieve": None, "folder": None, "file_name": None,
        }
        if not has_file:
            if kind == "FILE":
                raise InvalidInput("file_data is missing: a FILE data object needs its file "
                                   "(multipart/form-data with the file in 'file_data')")
            record.update(self._retrieve_fields(ds, fields))
            record["id"] = self.index.insert("dataobjects", record, id_field="id")
            log.info("dataset %d: data object %d waits for series %s (%s)", ds["id"], record["id"],
                     record["series_instance_uid"], record["dicom_retrieve"])
            if record["dicom_retrieve"] in ("MOVE", "GET"):
                source = self.location(owner, ds["from_dicom_location"])
                threading.Thread(target=self._fetch, args=(record, source), name=f"retrieve-{record['id']}",
                                 daemon=True).start()
            return self._object_json(record, [])
        assert upload is not None and upload.path is not None
        name = safe_name(fields.get("file_name") or upload.filename or "")
        content = work / "object"
        content.mkdir()
        series = None
        if name.lower().endswith(".zip"):
            h = self.config.http
            series = unpack_dicom_zip(upload.path, content, max_entries=h.max_zip_entries,
                                      max_bytes=int(h.max_unpacked_mb * 1e6))
            if series is None:
                shutil.rmtree(content)
                content.mkdir()
        if series is None:
            os.rename(upload.path, content / name)
            uid = jobs.dicom_series_uid(content / name)  # a file that claims to be DICOM must parse
            if kind == "DICOM" and uid is None:
                raise InvalidInput(f"{name}: a DICOM data object must be a DICOM file or a zip of one series")
            if uid is not None:
                series = {"series_instance_uid": uid, "instances": 1}
        if series is not None:
            given = fields.get("seriesUID")
            if given and given != series["series_instance_uid"]:
                raise InvalidInput(f"seriesUID {given} does not match the series uploaded "
                                   f"({series['series_instance_uid']})")
            record["series_instance_uid"] = series["series_instance_uid"]
            if name.lower().endswith(".zip"):  # a zipped series becomes a DICOM data object
                record.update(type="DICOM", meta_data={**meta, "instances": series["instances"]})
        folder = secrets.token_hex(6)
        ds_dir = self.root / str(ds["id"])
        if not ds_dir.is_dir():
            raise NotFound(f"dataset {ds['id']} (it has expired)")
        os.rename(content, ds_dir / folder)
        jobs.fsync_dir(ds_dir / folder)  # the file's own entry, made by a rename into it
        jobs.fsync_dir(ds_dir)
        record.update(folder=folder, file_name=name, is_fetched=True, size=upload.size)
        try:
            record["id"] = self.index.insert("dataobjects", record, id_field="id")
        except BaseException:
            shutil.rmtree(ds_dir / folder, ignore_errors=True)
            raise
        log.info("dataset %d: data object %d stored (%s, %s, %d bytes)", ds["id"], record["id"], record["type"],
                 name, upload.size)
        return self._object_json(record, [])

    def _retrieve_fields(self, ds: dict[str, Any], fields: Mapping[str, str]) -> dict[str, Any]:
        """A DICOM input that arrives later (PlatiPy's dicom_retrieve); served once the DICOM node exists."""
        retrieve = (fields.get("dicom_retrieve") or "").upper()
        if retrieve not in RETRIEVE:
            raise InvalidInput("a DICOM data object without a file needs dicom_retrieve (SEND, MOVE or GET) "
                               "and seriesUID; or upload the series as a zip in file_data")
        uid = (fields.get("seriesUID") or "").strip()
        if not _UID.match(uid) or len(uid) > 64:
            raise InvalidInput(f"seriesUID must be a DICOM UID (digits and dots, at most 64), not {uid!r}")
        if retrieve in ("MOVE", "GET") and ds.get("from_dicom_location") is None:
            raise InvalidInput(f"dicom_retrieve {retrieve} needs the dataset's from_dicom_location")
        if not self.config.dicom.enabled and retrieve != "GET":
            raise InvalidInput(f"dicom_retrieve {retrieve} needs this service's DICOM node (dicom.enabled)")
        waiting = {"SEND": f"waiting for the series to be sent to {self.config.dicom.ae_title}",
                   "MOVE": "asking the PACS to send the series (C-MOVE)", "GET": "fetching the series (C-GET)"}
        return {"series_instance_uid": uid, "dicom_retrieve": retrieve, "is_fetched": False,
                "status": waiting[retrieve]}

    def _fetch(self, record: dict[str, Any], source: dict[str, Any]) -> None:
        """C-MOVE (the node then receives the series) or C-GET (received here) a waiting DICOM input."""
        from pipeline import retrieve

        loc = Destination(host=source["host"], port=source["port"], ae_title=source["ae_title"] or "ANY-SCP")
        uid = record["series_instance_uid"]
        try:
            if record["dicom_retrieve"] == "MOVE":
                n = retrieve.move_series(loc, uid, destination_ae=self.config.dicom.ae_title,
                                         calling_ae=self.config.dicom.ae_title)
                self.index.update("dataobjects", {"status": f"{n} instance(s) moved; waiting for the series to "
                                                            "complete at the node"}, id=record["id"])
                return
            work = self.uploads / f"get-{secrets.token_hex(6)}"
            try:
                n = retrieve.get_series(loc, uid, work / "series", calling_ae=self.config.dicom.ae_title)
                if not n:
                    raise retrieve.RetrieveFailed(f"{loc.ae_title} returned no instance of series {uid}")
                self._file_series(record, work / "series", f"received {n} instance(s) by C-GET from "
                                                          f"{loc.ae_title}")
            finally:
                shutil.rmtree(work, ignore_errors=True)
        except (retrieve.RetrieveFailed, OSError, ValueError) as exc:
            log.warning("dataset %d: data object %d: %s", record["dataset"], record["id"], exc)
            self.index.update("dataobjects", {"status": f"failed: {exc}"}, id=record["id"])

    def attach_series(self, series_uid: str, folder: Path, sender: dict[str, Any]) -> bool:
        """Give a series completed at the DICOM node to the datasets waiting for it (SEND, MOVE).

        Returns False when no dataset waits for it: the node then makes it a job of its own.
        """
        waiting = [o for o in self.index.find("dataobjects", series_instance_uid=series_uid, is_fetched=False)
                   if o.get("dicom_retrieve") in ("SEND", "MOVE")]
        if not waiting:
            return False
        n = sum(1 for p in folder.iterdir() if p.suffix == ".dcm")
        for k, record in enumerate(waiting):
            source = folder
            if k < len(waiting) - 1:  # several datasets wait for one series: each gets its own copy
                source = self.uploads / f"copy-{secrets.token_hex(6)}"
                shutil.copytree(folder, source)
            self._file_series(record, source, f"received {n} instance(s) from {sender.get('calling_ae')}")
        return True

    def _file_series(self, record: dict[str, Any], series_dir: Path, status: str) -> None:
        """Move a received series into its dataset and mark the data object fetched."""
        ds_dir = self.root / str(record["dataset"])
        if not ds_dir.is_dir():
            raise OSError(f"dataset {record['dataset']} has expired")
        token = secrets.token_hex(6)
        os.rename(series_dir, ds_dir / token)
        jobs.fsync_dir(ds_dir)
        n = sum(1 for _ in (ds_dir / token).iterdir())
        self.index.update("dataobjects", {"is_fetched": True, "folder": token, "file_name": "series.zip",
                                          "status": status, "meta_data": {**(record.get("meta_data") or {}),
                                                                          "instances": n}}, id=record["id"])
        log.info("dataset %d: data object %d: %s", record["dataset"], record["id"], status)

    def object_record(self, owner: str, object_id: Any) -> dict[str, Any]:
        number = _number(object_id, "data object")
        found = self.index.find("dataobjects", id=number, owner=owner) or \
            self.index.find("dataobjects", id=number, owner=SITE)
        if not found:
            raise NotFound(f"data object {object_id}")
        return found[0]

    def object_json(self, owner: str, object_id: Any) -> dict[str, Any]:
        """A data object as the API shows it; an input lists the outputs of the latest run made from it."""
        record = self.object_record(owner, object_id)
        children = []
        found = self.index.find("datasets", id=record["dataset"]) if record["is_input"] else []
        if found:
            objects = self.index.find("dataobjects", dataset=record["dataset"])
            objects += self._record_outputs(found[0], objects)
            children = [self._object_json(o, []) for o in objects if o.get("parent") == record["id"]
                        and not o["is_input"] and o.get("job") == found[0].get("last_job")]
        return self._object_json(record, children)

    def objects(self, owner: str) -> list[dict[str, Any]]:
        """Every data object of this key's datasets, the outputs of finished runs included."""
        objects = self.index.find("dataobjects", owner=owner)
        for ds in self.index.find("datasets", owner=owner):
            objects += self._record_outputs(ds, [o for o in objects if o["dataset"] == ds["id"]])
        return [self._object_json(o, []) for o in objects]

    @staticmethod
    def _object_json(record: dict[str, Any], children: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": record["id"],
            "dataset_id": record["dataset"],
            "is_input": record["is_input"],
            "type": record["type"],
            "series_instance_uid": record.get("series_instance_uid"),
            "meta_data": record.get("meta_data") or None,
            "status": record.get("status"),
            "is_fetched": record["is_fetched"],
            "is_sent": record.get("is_sent", False),
            "parent_id": record.get("parent"),
            "children": children,
            "timestamp": record["timestamp"],
            "path": record.get("file_name"),  # the file's name only (PlatiPy showed a server path here)
            "dicom_retrieve": record.get("dicom_retrieve"),
            "job": record.get("job"),
        }

    def delete_object(self, owner: str, object_id: Any) -> dict[str, Any]:
        """Remove an input data object and its file; outputs belong to their job and stay."""
        record = self.object_record(owner, object_id)
        if not record["is_input"]:
            raise InvalidInput(f"data object {record['id']} is an output of job {record.get('job')}; "
                               "outputs are kept with their job and are not deleted")
        self.index.remove("dataobjects", id=record["id"])
        if record.get("folder"):
            shutil.rmtree(self.root / str(record["dataset"]) / record["folder"], ignore_errors=True)
        log.info("dataset %d: data object %d deleted", record["dataset"], record["id"])
        return {"id": record["id"], "deleted": True}

    def object_file(self, owner: str, object_id: Any) -> tuple[Path, str]:
        """Where a data object's content is on disk (a file or a folder) and the name to download it as."""
        record = self.object_record(owner, object_id)
        if record["is_input"]:
            if not record["is_fetched"] or not record.get("folder"):
                raise InvalidInput(f"data object {record['id']} has not been received yet")
            folder = self.root / str(record["dataset"]) / record["folder"]
            if not folder.is_dir():
                raise NotFound(f"the file of data object {record['id']} (its folder is gone)")
            path = folder / record["file_name"]
            # A file is sent as it came; an unpacked series (its folder) goes back as a zip of that name.
            return (path if path.is_file() else folder), record["file_name"]
        job_dir = jobs.locate(self.config.inbox, self.config.outbox, record["job"])
        if job_dir is None:
            raise NotFound(f"the folder of job {record['job']} (data object {record['id']})")
        path = (job_dir / record["output"]).resolve()
        if not path.is_relative_to(job_dir.resolve()) or not path.exists():
            raise NotFound(f"output {record['output']} of job {record['job']}")
        return path, path.name

    # -- runs -------------------------------------------------------------------------------------

    def trigger(self, owner: str, fields: Mapping[str, str], sender: dict[str, Any]) -> str:
        """Turn a dataset into a job in the inbox (the same stage-then-rename as every door); its id."""
        for key in ("dataset", "algorithm"):
            if fields.get(key) in (None, ""):
                raise InvalidInput(f"the field '{key}' is missing")
        alg = resolve(self.config, fields["algorithm"])  # UnknownAlgorithm: 404, as PlatiPy answers
        ds = self.get(owner, fields["dataset"], shared=False)
        settings: dict[str, Any] = {}
        if fields.get("config") not in (None, ""):
            try:
                settings = json.loads(fields["config"])
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"config is not JSON: {exc}") from None
            if not isinstance(settings, dict):
                raise InvalidInput("config must be a JSON object of the algorithm's settings")
        merge_settings(alg, settings)  # other keys or types: InvalidInput at the door, not a failed job
        inputs = self.index.find("dataobjects", dataset=ds["id"], is_input=True)
        if not inputs:
            raise InvalidInput(f"dataset {ds['id']} has no data objects; add one before running it")
        waiting = [o["id"] for o in inputs if not o["is_fetched"]]
        if waiting:
            raise InvalidInput(f"dataset {ds['id']} is not ready: data object(s) {waiting} have not arrived "
                               "(GET /api/dataset/ready/<id> says when they have)")
        folders = [self.root / str(ds["id"]) / o["folder"] for o in inputs]
        delivery = jobs.Delivery()
        if ds.get("to_dicom_location") is not None:
            loc = self.location(owner, ds["to_dicom_location"])
            # The DICOM outputs go back by C-STORE, like a routed DICOM job's (the sender retries).
            delivery.destinations.append({"host": loc["host"], "port": loc["port"],
                                          "ae_title": loc["ae_title"] or "ANY-SCP"})
        manifest = jobs.submit(self.config.inbox, folders, algorithm=alg.name, settings=settings, source="http",
                               how="link", index=self.index, dataset=str(ds["id"]), owner=owner, sender=sender,
                               delivery=delivery)
        self._touch(ds, last_job=manifest.id)
        log.info("dataset %d: job %s triggered (%s)", ds["id"], manifest.id, alg.name)
        return manifest.id

    def status(self, owner: str, job_id: str) -> dict[str, Any]:
        """PlatiPy's task status of a job this key started."""
        for _ in range(3):  # the job may move to the outbox while it is looked for or read: look again
            job_dir = jobs.locate(self.config.inbox, self.config.outbox, job_id)
            if job_dir is None:
                continue
            try:
                manifest = jobs.read_manifest(job_dir)
            except (FileNotFoundError, DamagedManifest):  # moved, or being set aside: look again
                continue
            if manifest.owner != owner:
                break
            done = job_dir.parent == self.config.outbox
            if done and manifest.status == jobs.JobStatus.DONE:
                return {"state": "SUCCESS", "current": 1, "total": 1, "status": "Done", "job": job_id}
            if done:
                return {"state": "FAILURE", "current": 1, "total": 1, "status": manifest.error or "failed",
                        "job": job_id}
            if manifest.status == jobs.JobStatus.PENDING:
                return {"state": "PENDING", "current": 0, "total": 1, "status": "Pending...", "job": job_id}
            return {"state": "RUNNING", "current": 0, "total": 1,
                    "status": f"Running Algorithm: {manifest.algorithm}", "job": job_id}
        raise NotFound(f"job {job_id}")

    def job_finished(self, manifest: jobs.JobManifest) -> None:
        """The worker's hook: record a dataset run's outputs now, off the client's next request."""
        if manifest.dataset is None or manifest.status != jobs.JobStatus.DONE:
            return
        found = self.index.find("datasets", id=_number(manifest.dataset, "dataset"))
        if found and found[0].get("last_job") == manifest.id:
            self._record_outputs(found[0], self.index.find("dataobjects", dataset=found[0]["id"]), manifest)

    def _record_outputs(self, ds: dict[str, Any], objects: list[dict[str, Any]],
                        manifest: jobs.JobManifest | None = None) -> list[dict[str, Any]]:
        """The outputs of the dataset's latest run, recorded when first seen once it is done (stable ids).

        ``objects`` are the dataset's records as read; returns the output records added to them.
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
        parents = self._input_objects([o for o in objects if o["is_input"]], manifest)
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

    @staticmethod
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

    # -- DICOM locations ----------------------------------------------------------------------------

    def add_location(self, owner: str, fields: Mapping[str, str]) -> dict[str, Any]:
        """A DICOM peer (name, host, port, ae_title) for datasets to fetch from or send to."""
        name, host = (fields.get("name") or "").strip(), (fields.get("host") or "").strip()
        if not name or not host:
            raise InvalidInput("a DICOM location needs 'name' and 'host'")
        port = _number(fields.get("port", ""), "port")
        if not 0 < port < 65536:
            raise InvalidInput(f"port must be a TCP port, not {port}")
        ae_title = (fields.get("ae_title") or "").strip() or None
        if ae_title is not None and (len(ae_title) > 16 or "\\" in ae_title):
            raise InvalidInput(f"ae_title must be at most 16 characters without backslash, not {ae_title!r}")
        record = {"owner": owner, "name": name, "host": host, "port": port, "ae_title": ae_title}
        loc_id = self.index.insert("locations", record, id_field="id")
        return self._location_json({**record, "id": loc_id})

    def location(self, owner: str, location_id: int) -> dict[str, Any]:
        found = self.index.find("locations", id=location_id, owner=owner)
        if not found:
            raise NotFound(f"DICOM location {location_id}")
        return self._location_json(found[0])

    def locations(self, owner: str) -> list[dict[str, Any]]:
        return [self._location_json(r) for r in self.index.find("locations", owner=owner)]

    def _location_or_none(self, owner: str, location_id: int | None) -> dict[str, Any] | None:
        if location_id is None:
            return None
        found = self.index.find("locations", id=location_id, owner=owner)
        return self._location_json(found[0]) if found else None

    @staticmethod
    def _location_json(record: dict[str, Any]) -> dict[str, Any]:
        return {k: record.get(k) for k in ("id", "name", "host", "port", "ae_title")}

    # -- expiry -------------------------------------------------------------------------------------

    def sweep(self, now: float | None = None) -> list[int]:
        """Remove datasets past their timeout (records and folder), and leftovers of crashed requests.

        A dataset whose latest run is still in the inbox is kept until it finishes; the jobs made from
        a dataset keep their own hard links to its inputs, and stay in the outbox.
        """
        now = time.time() if now is None else now
        removed = []
        records = self.index.find("datasets")
        for ds in records:
            if ds["expires"] > now:
                continue
            if ds.get("last_job") and (self.config.inbox / ds["last_job"]).is_dir():
                continue
            self.index.remove("dataobjects", dataset=ds["id"])
            self.index.remove("datasets", id=ds["id"])
            shutil.rmtree(self.root / str(ds["id"]), ignore_errors=True)
            removed.append(ds["id"])
            log.info("dataset %d: expired and removed (timeout %g h)", ds["id"], ds["timeout_hours"])
        known = {str(ds["id"]) for ds in records if ds["id"] not in removed}
        for folder in [*self.uploads.iterdir(), *self.root.iterdir()]:
            if folder.name.startswith(".") or folder.name in known:
                continue
            if now - jobs.newest_change(folder) > _LEFTOVER_SECONDS:
                shutil.rmtree(folder, ignore_errors=True)
                log.info("datasets: removed leftover folder %s", folder.name)
        return removed

