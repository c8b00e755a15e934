"""Who may see what: the HTTP door's datasets, data objects and DICOM locations, records in the index.

Every record carries its owner: the id of the key that made it (an int, :attr:`pipeline.index.ApiKey.id`),
never the key's name, so a name given again after its key was removed starts with nothing (issue 9). A
plain key sees only what it made. A site key (an operator's: ``postbox manage key --add NAME --site``) may
also read every other key's datasets and the jobs of the keyless doors (folder, DICOM, CLI), which show as
datasets owned by ``SITE``; no key adds to, deletes from or runs what it did not make. Records live in the
index's tables ``datasets``, ``dataobjects`` and ``locations`` (ids never reused); uploads live beside the
inbox, on its filesystem, so a trigger hard-links them into a job.

Layout::

    <inbox>/.datasets/<id>/<object>/<file name>   a FILE input
    <inbox>/.datasets/<id>/<object>/*.dcm         a DICOM input (one series)
    <inbox>/.datasets/.uploads/<token>/           a request body being received (removed when answered)
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from pipeline import jobs
from pipeline.checks import check_uid, dicom_series_uid, json_object, safe_name
from pipeline.config import Config
from pipeline.errors import DamagedManifest, InvalidInput
from pipeline.index import ApiKey, Index

from .errors import NotFound, QuotaExceeded
from .uploads import Upload, unpack_dicom_zip

log = logging.getLogger(__name__)

__all__ = ["DATASETS", "SITE", "UPLOADS", "Records", "forget_jobs", "record_id"]

DATASETS = ".datasets"
# Owner of the datasets that show jobs of the doors without keys (folder drop, DICOM, CLI): only a site key
# sees them (issue 9; before, every key did), and none may add to them or run them.
SITE = "*"
UPLOADS = ".uploads"
DEFAULT_TIMEOUT_HOURS = 24.0
RETRIEVE = ("SEND", "MOVE", "GET")
_LEFTOVER_SECONDS = 3600.0  # an upload folder or dataset folder untouched this long has no request behind it
_TABLES = ("datasets", "dataobjects", "locations")


def record_id(value: Any, what: str) -> int:
    """A record id from a form field or a path segment; InvalidInput if it is not a whole number."""
    try:
        number = int(str(value).strip())
    except ValueError:
        raise InvalidInput(f"{what} must be a whole number (an id), not {value!r}") from None
    return number


def forget_jobs(index: Index, job_ids: Collection[str]) -> int:
    """Drop the records of jobs that retention removed (issue 11); returns how many records went.

    A keyless door's job shows over HTTP as a site dataset of its own (``owner`` SITE, ``last_job`` the job):
    it goes with its data objects. The output data objects of any dataset's run of the job go too (a key's
    dataset itself stays: its inputs are the key's, and it expires by its own timeout).
    """
    gone = set(job_ids)
    if not gone:
        return 0
    site = index.remove_where("datasets", lambda r: r.get("owner") == SITE and r.get("last_job") in gone)
    site_ids = {r["id"] for r in site}
    objects = index.remove_where("dataobjects", lambda r: r.get("job") in gone or r.get("dataset") in site_ids)
    if site or objects:
        log.info("records: forgot %d site dataset(s) and %d data object(s) of %d removed job(s)", len(site),
                 len(objects), len(gone))
    return len(site) + len(objects)


def _bytes(path: Path) -> int:
    """What a file or a folder of files takes on disk (its files' sizes)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _mb(size: int) -> str:
    return f"{size / 1e6:.6f}".rstrip("0").rstrip(".")


class Records:
    """The HTTP door's records over one inbox and index; every read and write checks who asks.

    A method that takes ``key`` answers NotFound for a record that key may not see, exactly as for one
    that does not exist, so ids tell another key nothing. ``write=True`` asks for what the key itself
    made: a site key reads everything, but changes only its own.
    """

    def __init__(self, config: Config, index: Index) -> None:
        self.config = config
        self.index = index
        self.root = config.inbox / DATASETS
        self.uploads = self.root / UPLOADS
        self.uploads.mkdir(parents=True, exist_ok=True)
        self.adopt_legacy_owners()

    # -- ownership ---------------------------------------------------------------------------------

    @staticmethod
    def _may(key: ApiKey, record: Mapping[str, Any], *, write: bool) -> bool:
        return record.get("owner") == key.id or (key.site and not write)

    def adopt_legacy_owners(self) -> int:
        """Give the records of release 0.1, which name their owner by the key's name, to that key's id.

        A name becomes an id only for a key made by that release (it has no id of its own in its record)
        and made before the record: a key made since, even under the same name, never takes them over
        (issue 9: a removed key's name given again must not inherit its data). A name that no such key has
        stays as it is, and as owners are ids now, it belongs to nobody. Runs at every start; once the
        names are gone it only reads the three tables. Returns the records changed.
        """
        keys = {k.name: k for k in self.index.list_keys() if k.legacy}
        changed = 0
        for table in _TABLES:
            for record in self.index.find(table):
                owner = record.get("owner")
                if not isinstance(owner, str) or owner == SITE or owner not in keys:
                    continue
                key = keys[owner]
                made = record.get("timestamp")
                if made and key.created and str(made) < key.created:
                    continue  # made by an earlier key of that name, since removed
                changed += self.index.update(table, {"owner": key.id}, id=record["id"], owner=owner)
        if changed:
            log.info("records: %d record(s) of release 0.1 now owned by their key's id, not its name", changed)
        return changed

    # -- datasets -------------------------------------------------------------------------------------

    def create(self, key: ApiKey, fields: Mapping[str, str]) -> dict[str, Any]:
        """A new, empty dataset; ``timeout`` is in hours (default 24), locations are ids this key owns.

        Raises
        ------
        QuotaExceeded
            When the key has ``http.max_datasets_per_key`` datasets already.
        """
        hours = DEFAULT_TIMEOUT_HOURS
        if fields.get("timeout") not in (None, ""):
            try:
                hours = float(fields["timeout"])
            except ValueError:
                raise InvalidInput(f"timeout must be a number of hours, not {fields['timeout']!r}") from None
            if not 0 < hours <= 24 * 366:
                raise InvalidInput(f"timeout must be more than 0 and at most a year in hours, not {hours:g}")
        locations = {}
        for name in ("from_dicom_location", "to_dicom_location"):
            if fields.get(name) not in (None, ""):
                loc = self.location(key, record_id(fields[name], name))
                self.check_host(loc["host"])
                locations[name] = loc["id"]
        most = self.config.http.max_datasets_per_key
        # Counted, then inserted: requests of one key at the same moment may pass it by a few (at most
        # http.threads), which a quota against filling the disk can afford.
        if len(self.index.find("datasets", owner=key.id)) >= most:
            raise QuotaExceeded(f"key '{key.name}' has {most} datasets, as many as http.max_datasets_per_key "
                                "allows; a dataset goes when its timeout passes")
        now = time.time()
        record = {"owner": key.id, "timestamp": jobs.now_iso(), "timeout_hours": hours, "expires": now + hours * 3600,
                  "from_dicom_location": locations.get("from_dicom_location"),
                  "to_dicom_location": locations.get("to_dicom_location"), "last_job": None}
        ds_id = self.index.insert("datasets", record, id_field="id")
        (self.root / str(ds_id)).mkdir(parents=True, exist_ok=True)
        log.info("dataset %d: created for key %s (kept %g h)", ds_id, key.tag, hours)
        return {**record, "id": ds_id}

    def dataset(self, key: ApiKey, dataset_id: Any, *, write: bool = False) -> dict[str, Any]:
        """The dataset record; NotFound unless the key made it (or, reading, it is a site key)."""
        found = self.index.find("datasets", id=record_id(dataset_id, "dataset"))
        if not found or not self._may(key, found[0], write=write):
            raise NotFound(f"dataset {dataset_id}")
        return found[0]

    def visible(self, key: ApiKey) -> list[dict[str, Any]]:
        """The datasets a key lists: its own; for a site key every key's, then the keyless doors' latest jobs.

        The keyless doors' jobs are bounded by ``http.site_jobs`` (the latest); older ones keep their
        datasets, which a site key still reads by id.
        """
        if not key.site:
            return self.index.find("datasets", owner=key.id)
        self.adopt_site_jobs()
        every = self.index.find("datasets")
        limit = self.config.http.site_jobs
        site = sorted((r for r in every if r["owner"] == SITE), key=lambda r: r["last_job"])[-limit:] if limit else []
        return [r for r in every if r["owner"] != SITE] + site

    def adopt_site_jobs(self) -> None:
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

    def ready(self, record: dict[str, Any]) -> bool:
        """True once the dataset has inputs and every one of them has arrived (PlatiPy's meaning)."""
        inputs = self.index.find("dataobjects", dataset=record["id"], is_input=True)
        return bool(inputs) and all(o["is_fetched"] for o in inputs)

    def touch(self, record: dict[str, Any], **fields: Any) -> None:
        """Record a run of a dataset: its timeout counts again from now."""
        self.index.update("datasets", {**fields, "expires": time.time() + record["timeout_hours"] * 3600},
                          id=record["id"])

    # -- data objects -----------------------------------------------------------------------------------

    def add_object(self, key: ApiKey, fields: Mapping[str, str], upload: Upload | None,
                   work: Path) -> dict[str, Any]:
        """Add an input data object to one of the key's datasets from a request's fields and (optionally) its file.

        ``work`` is the request's private folder under ``.datasets/.uploads``; what is kept is renamed
        from there into the dataset's folder, and the record is written last, so a refusal at any step
        leaves neither a file nor a record. A DICOM input without a file waits for its series
        (``dicom_retrieve``); the caller starts the retrieval of a MOVE or GET.

        Raises
        ------
        QuotaExceeded
            When the file would take the key past ``http.max_stored_mb_per_key``.
        """
        if fields.get("dataset") in (None, ""):
            raise InvalidInput("the field 'dataset' (the dataset id) is missing")
        ds = self.dataset(key, fields["dataset"], write=True)
        has_file = upload is not None and upload.path is not None
        kind = (fields.get("type") or ("FILE" if has_file else "")).upper()
        if kind not in ("FILE", "DICOM"):
            raise InvalidInput(f"type must be FILE or DICOM, not {fields.get('type')!r}")
        meta: dict[str, Any] = {}
        if fields.get("meta_data") not in (None, ""):
            meta = json_object(fields["meta_data"], "meta_data")
        parent = None
        if fields.get("parent") not in (None, ""):
            found = self.index.find("dataobjects", id=record_id(fields["parent"], "parent"), dataset=ds["id"])
            if not found:
                raise NotFound(f"parent data object {fields['parent']} in dataset {ds['id']}")
            parent = found[0]["id"]
        record: dict[str, Any] = {
            "dataset": ds["id"], "owner": key.id, "is_input": True, "type": kind, "meta_data": meta,
            "parent": parent, "timestamp": jobs.now_iso(), "is_sent": False, "status": None,
            "series_instance_uid": None, "dicom_retrieve": None, "folder": None, "file_name": None,
        }
        if not has_file:
            if kind == "FILE":
                raise InvalidInput("file_data is missing: a FILE data object needs its file "
                                   "(multipart/form-data with the file in 'file_data')")
            record.update(self._retrieve_fields(key, ds, fields))
            self.check_stored(key)
            record["id"] = self.index.insert("dataobjects", record, id_field="id")
            log.info("dataset %d: data object %d waits for series %s (%s)", ds["id"], record["id"],
                     record["series_instance_uid"], record["dicom_retrieve"])
            return record
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
            uid = dicom_series_uid(content / name)  # a file that claims to be DICOM must parse
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
        size = _bytes(content)  # what it takes on disk: an unpacked series, not the zip it came in
        self.check_stored(key, size)
        folder = secrets.token_hex(6)
        ds_dir = self.root / str(ds["id"])
        if not ds_dir.is_dir():
            raise NotFound(f"dataset {ds['id']} (it has expired)")
        os.rename(content, ds_dir / folder)
        jobs.fsync_dir(ds_dir / folder)  # the file's own entry, made by a rename into it
        jobs.fsync_dir(ds_dir)
        record.update(folder=folder, file_name=name, is_fetched=True, size=size)
        try:
            record["id"] = self.index.insert("dataobjects", record, id_field="id")
        except BaseException:
            shutil.rmtree(ds_dir / folder, ignore_errors=True)
            raise
        log.info("dataset %d: data object %d stored (%s, %s, %d bytes)", ds["id"], record["id"], record["type"],
                 name, size)
        return record

    def _retrieve_fields(self, key: ApiKey, ds: dict[str, Any], fields: Mapping[str, str]) -> dict[str, Any]:
        """A DICOM input that arrives later (PlatiPy's dicom_retrieve): SEND, MOVE or GET."""
        retrieve = (fields.get("dicom_retrieve") or "").upper()
        if retrieve not in RETRIEVE:
            raise InvalidInput("a DICOM data object without a file needs dicom_retrieve (SEND, MOVE or GET) "
                               "and seriesUID; or upload the series as a zip in file_data")
        uid = check_uid((fields.get("seriesUID") or "").strip(), "seriesUID")
        if retrieve in ("MOVE", "GET") and ds.get("from_dicom_location") is None:
            raise InvalidInput(f"dicom_retrieve {retrieve} needs the dataset's from_dicom_location")
        if not self.config.dicom.enabled and retrieve != "GET":
            raise InvalidInput(f"dicom_retrieve {retrieve} needs this service's DICOM node (dicom.enabled)")
        source = self.location(key, ds["from_dicom_location"]) if ds.get("from_dicom_location") is not None else None
        if retrieve in ("SEND", "MOVE") and (source is None or not source["ae_title"]):
            # Issue 9: a series is taken for a dataset only from the AE title its location names; without
            # one, any sender's series of that UID (a modality's own) would be diverted to this key.
            raise InvalidInput(f"dicom_retrieve {retrieve} needs the dataset's from_dicom_location with an "
                               "ae_title: only a series sent by that AE title is taken for the dataset")
        if source is not None and retrieve in ("MOVE", "GET"):
            self.check_host(source["host"])
        waiting = {"SEND": f"waiting for the series to be sent to {self.config.dicom.ae_title}",
                   "MOVE": "asking the PACS to send the series (C-MOVE)", "GET": "fetching the series (C-GET)"}
        # ``fetching``: a retrieval to make; a service stopped before it ended makes it at its next start.
        return {"series_instance_uid": uid, "dicom_retrieve": retrieve, "is_fetched": False,
                "status": waiting[retrieve], "fetching": retrieve in ("MOVE", "GET")}

    def file_series(self, record: dict[str, Any], series_dir: Path, status: str) -> None:
        """Move a received series into its dataset and mark the data object fetched."""
        ds_dir = self.root / str(record["dataset"])
        if not ds_dir.is_dir():
            raise OSError(f"dataset {record['dataset']} has expired")
        token = secrets.token_hex(6)
        os.rename(series_dir, ds_dir / token)
        jobs.fsync_dir(ds_dir)
        n = sum(1 for _ in (ds_dir / token).iterdir())
        self.index.update("dataobjects", {"is_fetched": True, "fetching": False, "folder": token,
                                          "file_name": "series.zip", "size": _bytes(ds_dir / token),
                                          "status": status, "meta_data": {**(record.get("meta_data") or {}),
                                                                          "instances": n}}, id=record["id"])
        log.info("dataset %d: data object %d: %s", record["dataset"], record["id"], status)

    def object_record(self, key: ApiKey, object_id: Any, *, write: bool = False) -> dict[str, Any]:
        """The data object's record; NotFound unless the key made it (or, reading, it is a site key)."""
        found = self.index.find("dataobjects", id=record_id(object_id, "data object"))
        if not found or not self._may(key, found[0], write=write):
            raise NotFound(f"data object {object_id}")
        return found[0]

    def delete_object(self, key: ApiKey, object_id: Any) -> dict[str, Any]:
        """Remove an input data object the key made, and its file; outputs belong to their job and stay."""
        record = self.object_record(key, object_id, write=True)
        if not record["is_input"]:
            raise InvalidInput(f"data object {record['id']} is an output of job {record.get('job')}; "
                               "outputs are kept with their job and are not deleted")
        self.index.remove("dataobjects", id=record["id"])
        if record.get("folder"):
            shutil.rmtree(self.root / str(record["dataset"]) / record["folder"], ignore_errors=True)
        log.info("dataset %d: data object %d deleted", record["dataset"], record["id"])
        return {"id": record["id"], "deleted": True}

    def object_file(self, key: ApiKey, object_id: Any) -> tuple[Path, str]:
        """Where a data object's content is on disk (a file or a folder) and the name to download it as."""
        record = self.object_record(key, object_id)
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

    def preview_file(self, key: ApiKey, dataset_id: Any) -> tuple[Path, dict[str, Any]]:
        """The contour preview of the dataset's latest run (issue 11) and the dataset's record.

        NotFound unless the key may read the dataset (as :meth:`dataset`), and until the run has a preview.
        """
        record = self.dataset(key, dataset_id)
        job_id = record.get("last_job")
        job_dir = self.config.outbox / job_id if job_id and jobs.is_job_id(job_id) else None
        try:
            preview = jobs.read_manifest(job_dir).preview if job_dir is not None else None
        except (FileNotFoundError, DamagedManifest):
            preview = None
        if job_dir is None or preview is None:
            raise NotFound(f"a preview of dataset {record['id']}'s latest run (none drawn yet)")
        path = (job_dir / preview).resolve()
        if not path.is_relative_to(job_dir.resolve()) or not path.is_file():
            raise NotFound(f"the preview of dataset {record['id']}")
        return path, record

    # -- quotas ----------------------------------------------------------------------------------------

    def stored_bytes(self, key: ApiKey) -> int:
        """What the key's inputs take on disk (uploads and retrieved series; outputs are their jobs')."""
        total = 0
        for o in self.index.find("dataobjects", owner=key.id, is_input=True):
            if o.get("size") is not None:
                total += int(o["size"])
            elif o.get("folder"):  # a record of release 0.1, which kept no size: measured where it lies
                folder = self.root / str(o["dataset"]) / o["folder"]
                total += _bytes(folder) if folder.exists() else 0
        return total

    def check_stored(self, key: ApiKey, adding: int = 0) -> None:
        """QuotaExceeded if the key's inputs and ``adding`` more bytes would pass ``http.max_stored_mb_per_key``."""
        limit = self.config.http.max_stored_mb_per_key
        stored = self.stored_bytes(key)
        fix = "delete data objects, or wait for datasets to expire"
        if adding == 0 and stored >= limit * 1e6:
            raise QuotaExceeded(f"key '{key.name}' stores {_mb(stored)} MB, as much as http.max_stored_mb_per_key "
                                f"({limit:g} MB) allows; {fix}")
        if stored + adding > limit * 1e6:
            raise QuotaExceeded(f"key '{key.name}' stores {_mb(stored)} MB; {_mb(adding)} MB more would pass "
                                f"http.max_stored_mb_per_key ({limit:g} MB); {fix}")

    # -- DICOM locations ----------------------------------------------------------------------------------

    def check_host(self, host: str) -> None:
        """InvalidInput unless the operator allows DICOM locations on ``host`` (``http.allowed_locations``).

        Checked when a location is made and again at each use (a C-MOVE, a C-GET, results sent there): an
        entry taken off the list stops the locations made with it.
        """
        destinations = [d.host for d in self.config.dicom.destinations.values()]
        if not self.config.http.allows_location(host, destinations=destinations):
            raise InvalidInput(f"DICOM location host {host!r} is not allowed: only the hosts on "
                               "http.allowed_locations (while it is empty, those of dicom.destinations) may be "
                               "used; ask the operator to add it")

    def add_location(self, key: ApiKey, fields: Mapping[str, str]) -> dict[str, Any]:
        """A DICOM peer (name, host, port, ae_title) for the key's datasets to fetch from or send to."""
        name, host = (fields.get("name") or "").strip(), (fields.get("host") or "").strip()
        if not name or not host:
            raise InvalidInput("a DICOM location needs 'name' and 'host'")
        port = record_id(fields.get("port", ""), "port")
        if not 0 < port < 65536:
            raise InvalidInput(f"port must be a TCP port, not {port}")
        ae_title = (fields.get("ae_title") or "").strip() or None
        if ae_title is not None and (len(ae_title) > 16 or "\\" in ae_title):
            raise InvalidInput(f"ae_title must be at most 16 characters without backslash, not {ae_title!r}")
        self.check_host(host)
        record = {"owner": key.id, "name": name, "host": host, "port": port, "ae_title": ae_title}
        loc_id = self.index.insert("locations", record, id_field="id")
        return self.location_json({**record, "id": loc_id})

    def location(self, key: ApiKey, location_id: int) -> dict[str, Any]:
        """One of the key's own locations (a site key too uses only its own)."""
        found = self.index.find("locations", id=location_id, owner=key.id)
        if not found:
            raise NotFound(f"DICOM location {location_id}")
        return self.location_json(found[0])

    def locations(self, key: ApiKey) -> list[dict[str, Any]]:
        return [self.location_json(r) for r in self.index.find("locations", owner=key.id)]

    def location_of(self, owner: Any, location_id: int | None) -> dict[str, Any] | None:
        """A dataset's location, looked up as its owner's; None if it has none (or it is gone)."""
        if location_id is None:
            return None
        found = self.index.find("locations", id=location_id, owner=owner)
        return self.location_json(found[0]) if found else None

    @staticmethod
    def location_json(record: dict[str, Any]) -> dict[str, Any]:
        return {k: record.get(k) for k in ("id", "name", "host", "port", "ae_title")}

    # -- expiry ---------------------------------------------------------------------------------------------

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
