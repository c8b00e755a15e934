"""The OpenAPI 3 description of the HTTP API, served at GET /api/openapi.json (a test keeps it in step with the app)."""

from __future__ import annotations

from typing import Any

from pipeline.config import Config

__all__ = ["ROUTES", "document"]

# (name, type, required, description); form fields may also be sent as query arguments.
_DATASET_ID = ("dataset_id", "integer", True, "a dataset id this key owns")
_OBJECT_ID = ("object_id", "integer", True, "a data object id this key owns")
_E400 = "refused input: a missing or malformed field, or a dataset not ready"
_E401 = "no API_KEY header, or a key that is not valid"
_E404 = "not found, or not this key's (a site key reads every key's and the keyless doors' jobs)"
_E429 = "over one of the key's quotas (http.max_datasets_per_key, http.max_stored_mb_per_key)"

ROUTES: list[dict[str, Any]] = [
    {"method": "GET", "path": "/api/health", "auth": False, "summary": "The service is up; the upload limit",
     "responses": {200: "{status, service, version, max_upload_mb}"}},
    {"method": "GET", "path": "/api/openapi.json", "summary": "This document", "responses": {200: "OpenAPI 3"}},
    {"method": "GET", "path": "/metrics",
     "summary": "Prometheus metrics (text format): a site key, or no key from an address on metrics.allowed_hosts",
     "responses": {200: "the exposition, text/plain; version=0.0.4", 403: "a key that is not a site key"}},
    {"method": "GET", "path": "/api/algorithm", "summary": "The algorithms and their default settings",
     "responses": {200: "[{name, default_settings}]"}},
    {"method": "GET", "path": "/api/dicomlocation", "summary": "This key's DICOM locations",
     "responses": {200: "[{id, name, host, port, ae_title}]"}},
    {"method": "POST", "path": "/api/dicomlocation", "summary": "Add a DICOM location (used by the DICOM node)",
     "form": [("name", "string", True, "a name for the peer"),
              ("host", "string", True, "host name or IP; only hosts on the operator's http.allowed_locations"),
              ("port", "integer", True, "its DICOM port"),
              ("ae_title", "string", False, "its AE title (needed to wait for a series it sends or is moved)")],
     "responses": {200: "{id, name, host, port, ae_title}", 400: _E400 + ", or a host not allowed"}},
    {"method": "POST", "path": "/api/dataset", "summary": "Create an empty dataset",
     "form": [("from_dicom_location", "integer", False, "location id to fetch DICOM inputs from"),
              ("to_dicom_location", "integer", False, "location id to send DICOM outputs to"),
              ("timeout", "number", False, "hours to keep it after its creation or last run (default 24)")],
     "responses": {200: "the dataset", 400: _E400 + ", or a location whose host is no longer allowed",
                   404: "a location this key does not own", 429: _E429}},
    {"method": "GET", "path": "/api/datasets",
     "summary": "This key's datasets; a site key's also every key's, and the latest jobs of the folder, DICOM "
                "and CLI doors (http.site_jobs)", "responses": {200: "[dataset]"}},
    {"method": "GET", "path": "/api/dataset/{dataset_id}", "summary": "One dataset, with the outputs of its latest run",
     "path_params": [_DATASET_ID], "responses": {200: "the dataset", 404: _E404}},
    {"method": "GET", "path": "/api/dataset/ready/{dataset_id}",
     "summary": "Whether every input has arrived (false while empty)", "path_params": [_DATASET_ID],
     "responses": {200: "{ready: bool}", 404: _E404}},
    {"method": "GET", "path": "/api/dataset/{dataset_id}/preview",
     "summary": "The contour preview of the latest run (PNG: axial, coronal and sagittal slices with each "
                "structure's outline), once drawn after the run's results were sent",
     "path_params": [_DATASET_ID], "responses": {200: "the PNG", 404: _E404 + "; or no preview (yet)"}},
    {"method": "POST", "path": "/api/dataobject",
     "summary": "Add an input: a file (a .zip of one DICOM series becomes a DICOM object), or a DICOM series "
                "to be retrieved",
     "form": [("dataset", "integer", True, "the dataset id"), ("type", "string", True, "FILE or DICOM"),
              ("file_name", "string", False, "the file's name (reduced to a safe base name)"),
              ("file_data", "binary", False, "the file (multipart/form-data)"),
              ("parent", "integer", False, "a data object of the same dataset"),
              ("meta_data", "string", False, "a JSON object"),
              ("seriesUID", "string", False, "DICOM: the SeriesInstanceUID"),
              ("dicom_retrieve", "string", False, "DICOM without a file: SEND, MOVE or GET; SEND and MOVE take "
                                                  "the series only from the AE title of the dataset's "
                                                  "from_dicom_location")],
     "responses": {200: "the data object", 400: _E400, 404: "dataset or parent not found",
                   413: "the file, the request, or the unpacked zip is over a limit", 429: _E429}},
    {"method": "GET", "path": "/api/dataobjects", "summary": "The data objects of the datasets this key lists",
     "responses": {200: "[data object]"}},
    {"method": "GET", "path": "/api/dataobject/{object_id}", "summary": "One data object",
     "path_params": [_OBJECT_ID], "responses": {200: "the data object", 404: _E404}},
    {"method": "DELETE", "path": "/api/dataobject/{object_id}", "summary": "Delete an input and its file",
     "path_params": [_OBJECT_ID], "responses": {200: "{id, deleted}", 400: "an output (kept with its job)",
                                                404: _E404}},
    {"method": "GET", "path": "/api/dataobject/download/{object_id}",
     "summary": "The object's file (Content-Disposition: attachment; filename=NAME); a series as a zip",
     "path_params": [_OBJECT_ID], "responses": {200: "the file", 400: "an input not received yet", 404: _E404}},
    {"method": "POST", "path": "/api/trigger", "summary": "Run an algorithm on a dataset (a new job each time)",
     "form": [("dataset", "integer", True, "the dataset id"), ("algorithm", "string", True, "its exact name"),
              ("config", "string", False, "a JSON object of settings; keys must be the algorithm's defaults'")],
     "responses": {200: "{poll: /api/status/<job>}",
                   400: "empty or not-ready dataset, bad config, a to_dicom_location whose host is not allowed",
                   404: "unknown algorithm or dataset"}},
    {"method": "GET", "path": "/api/status/{job_id}", "summary": "A run's state",
     "path_params": [("job_id", "string", True, "from the trigger's poll URL")],
     "query": [("wait", "integer", False, "milliseconds a PENDING or RUNNING answer may be held for the job to "
                "end (default and most: http.status_wait_ms; 0: answer at once)")],
     "responses": {200: "{state: PENDING|RUNNING|SUCCESS|FAILURE, current, total, status}",
                   400: "wait is not a whole number", 404: _E404}},
]


def _schema(kind: str) -> dict[str, Any]:
    return {"type": "string", "format": "binary"} if kind == "binary" else {"type": kind}


def document(config: Config, version: str) -> dict[str, Any]:
    """The OpenAPI document for this service's routes."""
    paths: dict[str, dict[str, Any]] = {}
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for r in ROUTES:
        op: dict[str, Any] = {"summary": r["summary"], "responses": {}}
        for code, text in r["responses"].items():
            op["responses"][str(code)] = {"description": text, **(error if code >= 400 else {})}
        if r.get("auth", True):
            op["responses"]["401"] = {"description": _E401, **error}
        else:
            op["security"] = []
        params = [{"name": n, "in": "path", "required": True, "description": d, "schema": _schema(t)}
                  for n, t, _, d in r.get("path_params", [])]
        params += [{"name": n, "in": "query", "required": req, "description": d, "schema": _schema(t)}
                   for n, t, req, d in r.get("query", [])]
        if r.get("form"):
            params += [{"name": n, "in": "query", "required": False, "description": f"or as a form field: {d}",
                        "schema": _schema(t)} for n, t, _, d in r["form"] if t != "binary"]
            props = {n: {**_schema(t), "description": d} for n, t, _, d in r["form"]}
            required = [n for n, _, req, _ in r["form"] if req]
            body = {"type": "object", "properties": props, "required": required}
            kinds = ("multipart/form-data", "application/x-www-form-urlencoded")
            op["requestBody"] = {"content": {k: {"schema": body} for k in kinds}}
        if params:
            op["parameters"] = params
        paths.setdefault(r["path"], {})[r["method"].lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "Postbox", "version": version,
                 "description": "PlatiPy-compatible dataset and run API. Uploads are limited to "
                                f"{config.http.max_upload_mb:g} MB."},
        "paths": paths,
        "components": {
            "securitySchemes": {"api_key": {"type": "apiKey", "in": "header", "name": "API_KEY"}},
            "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "string"}},
                                  "required": ["error"]}},
        },
        "security": [{"api_key": []}],
    }
