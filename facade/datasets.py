"""The HTTP door's datasets as the API shows them: the records, runs and retrieval of one service, together.

A dataset is PlatiPy's unit of work: a client creates it, uploads inputs into it, triggers a run and
downloads the outputs. Who may see what is :mod:`facade.records`; runs (trigger, status, outputs) are
:mod:`facade.runs`; C-MOVE, C-GET and series handed over by the DICOM node are :mod:`facade.retrieval`.
This module joins them into PlatiPy's views (a dataset with its inputs and its latest run's outputs) and
gives the service what it wires: ``job_finished`` (the worker's hook), ``attach_series`` (the node's
claimer), ``sweep`` (expiry), ``start`` and ``stop``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline import jobs
from pipeline.config import Config
from pipeline.index import ApiKey, Index

from .errors import NotFound
from .records import DATASETS, SITE, Records
from .retrieval import Retrieval
from .runs import Runs
from .uploads import Upload

log = logging.getLogger(__name__)

__all__ = ["DATASETS", "SITE", "Datasets", "NotFound"]


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="milliseconds")


def object_json(record: dict[str, Any], children: list[dict[str, Any]]) -> dict[str, Any]:
    """A data object as the API shows it (PlatiPy's fields; never its owner or a server path)."""
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


class Datasets:
    """The HTTP door's store: ``records`` (ownership), ``runs`` and ``retrieval``, and the views joining them."""

    def __init__(self, config: Config, index: Index) -> None:
        self.config = config
        self.index = index
        self.records = Records(config, index)
        self.runs = Runs(config, index, self.records)
        self.retrieval = Retrieval(config, index, self.records)
        self.uploads = self.records.uploads

    # -- what the service wires (pipeline/service.py, facade/server.py) --

    def start(self) -> None:
        """Start the retrieval worker (it also starts at the first retrieval asked for)."""
        self.retrieval.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.retrieval.stop(timeout)

    def job_finished(self, manifest: jobs.JobManifest) -> None:
        """The worker's hook: a dataset run's outputs are recorded as it finishes."""
        self.runs.job_finished(manifest)

    def attach_series(self, series_uid: str, folder: Path, sender: dict[str, Any]) -> bool:
        """The DICOM node's claimer: a series a dataset waits for goes to it (see ``Retrieval.attach_series``)."""
        return self.retrieval.attach_series(series_uid, folder, sender)

    def sweep(self, now: float | None = None) -> list[int]:
        """Remove expired datasets and leftovers of crashed requests (``Records.sweep``).

        The HTTP server sweeps first thing once it listens: until it calls ``start`` itself, that is where
        the retrieval worker starts and takes up what a stopped service left to fetch (``start`` does it once).
        """
        self.retrieval.start()
        return self.records.sweep(now)

    # -- the API's views --

    def create(self, key: ApiKey, fields: Mapping[str, str]) -> dict[str, Any]:
        return self.describe(self.records.create(key, fields))

    def dataset(self, key: ApiKey, dataset_id: Any) -> dict[str, Any]:
        return self.describe(self.records.dataset(key, dataset_id))

    def listing(self, key: ApiKey) -> list[dict[str, Any]]:
        """The datasets the key may list: its own; a site key's also every key's and the keyless doors'."""
        return [self.describe(r) for r in self.records.visible(key)]

    def describe(self, record: dict[str, Any]) -> dict[str, Any]:
        """The dataset as the API shows it (PlatiPy's fields; never the owner's key or a server path)."""
        objects = self.index.find("dataobjects", dataset=record["id"])
        objects += self.runs.record_outputs(record, objects)
        outputs = [o for o in objects if not o["is_input"] and o.get("job") == record.get("last_job")]
        children: dict[int, list[dict[str, Any]]] = {}
        for o in outputs:
            if o.get("parent") is not None:
                children.setdefault(o["parent"], []).append(object_json(o, []))
        locations = {k: self.records.location_of(record["owner"], record.get(k))
                     for k in ("from_dicom_location", "to_dicom_location")}
        # Only a dataset with a location to send to (or a routed DICOM job) has sends to read.
        sendable = record.get("to_dicom_location") is not None or record["owner"] == SITE
        sent = sendable and self.runs.sent(record.get("last_job"))
        return {
            "id": record["id"],
            "input_data_objects": [object_json(o, children.get(o["id"], [])) for o in objects if o["is_input"]],
            "output_data_objects": [object_json({**o, "is_sent": sent and o["type"] == "DICOM"}, [])
                                    for o in outputs],
            "from_dicom_location": locations["from_dicom_location"],
            "from_dicom_location_id": record.get("from_dicom_location"),
            "to_dicom_location": locations["to_dicom_location"],
            "to_dicom_location_id": record.get("to_dicom_location"),
            "timestamp": record["timestamp"],
            "timeout": _iso(record["expires"]),
            "last_job": record.get("last_job"),
        }

    def add_object(self, key: ApiKey, fields: Mapping[str, str], upload: Upload | None,
                   work: Path) -> dict[str, Any]:
        """Add an input to one of the key's datasets; a DICOM input to MOVE or GET starts its retrieval."""
        record = self.records.add_object(key, fields, upload, work)
        if record.get("dicom_retrieve") in ("MOVE", "GET"):
            self.retrieval.submit(record)
        return object_json(record, [])

    def object_json(self, key: ApiKey, object_id: Any) -> dict[str, Any]:
        """A data object as the API shows it; an input lists the outputs of the latest run made from it."""
        record = self.records.object_record(key, object_id)
        children = []
        found = self.index.find("datasets", id=record["dataset"]) if record["is_input"] else []
        if found:
            objects = self.index.find("dataobjects", dataset=record["dataset"])
            objects += self.runs.record_outputs(found[0], objects)
            children = [object_json(o, []) for o in objects if o.get("parent") == record["id"]
                        and not o["is_input"] and o.get("job") == found[0].get("last_job")]
        return object_json(record, children)

    def objects(self, key: ApiKey) -> list[dict[str, Any]]:
        """Every data object of the datasets the key lists, the outputs of finished runs included."""
        visible = self.records.visible(key)
        by_dataset: dict[int, list[dict[str, Any]]] = {ds["id"]: [] for ds in visible}
        for o in self.index.find("dataobjects"):  # one read of the table, not one per dataset
            if o["dataset"] in by_dataset:
                by_dataset[o["dataset"]].append(o)
        result = []
        for ds in visible:
            objects = by_dataset[ds["id"]]
            result += objects + self.runs.record_outputs(ds, objects)
        return [object_json(o, []) for o in result]
