"""The HTTP API, wire-compatible with PlatiPy's service framework: ``make_app(config, index) -> bottle.Bottle``.

Routes are thin: they read parameters (form fields or query arguments), call :class:`Datasets` with the
request's key, and answer JSON. Errors are translated here and nowhere else: ``InvalidInput`` 400,
``TooLarge`` 413, ``NotFound`` and ``UnknownAlgorithm`` 404, ``QuotaExceeded`` 429, a bad key 401, each as
``{"error": message}``, with no server path in it.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import secrets
import shutil
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bottle

from pipeline.audit import AuditLog
from pipeline.config import Config
from pipeline.errors import InvalidInput, PostboxError, UnknownAlgorithm
from pipeline.health import Health
from pipeline.index import Index

from . import openapi
from ._paths import hide_paths
from ._zipstream import CHUNK, zip_stream
from .auth import KeyAuth, current_key
from .dashboard import install as install_dashboard
from .datasets import Datasets
from .errors import NotFound, QuotaExceeded
from .metrics import exposition
from .uploads import ClientGone, TooLarge, read_multipart

log = logging.getLogger(__name__)

__all__ = ["json_response", "make_app"]

VERSION = "0.1.0"
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def json_response(data: Any, status: int = 200) -> bottle.HTTPResponse:
    """``data`` as a JSON answer (Bottle turns only dicts into JSON by itself, not lists)."""
    return bottle.HTTPResponse(json.dumps(data), status, headers={"Content-Type": "application/json"})


def _error(status: int, message: str) -> bottle.HTTPResponse:
    return json_response({"error": message}, status)


def _status_of(exc: PostboxError) -> int:
    if isinstance(exc, TooLarge):
        return 413
    if isinstance(exc, (NotFound, UnknownAlgorithm)):
        return 404
    if isinstance(exc, QuotaExceeded):
        return 429
    if isinstance(exc, InvalidInput):
        return 400
    return 500


class _Translate:
    """Bottle plugin: a PostboxError raised by a route becomes its 4xx JSON answer, logged once."""

    name = "postbox_errors"
    api = 2

    def __init__(self, config: Config) -> None:
        self.config = config

    def apply(self, callback: Callable[..., Any], route: bottle.Route) -> Callable[..., Any]:
        @functools.wraps(callback)
        def translated(*args: Any, **kwargs: Any) -> Any:
            try:
                return callback(*args, **kwargs)
            except PostboxError as exc:
                status = _status_of(exc)
                message = hide_paths(str(exc), self.config)  # issue 9: no server path in any answer
                if status == 500:
                    log.exception("http: %s %s failed", bottle.request.method, bottle.request.path)
                else:
                    log.warning("http: %s %s refused (%d): %s", bottle.request.method, bottle.request.path,
                                status, message)
                return _error(status, message)

        return translated


def _fields() -> dict[str, str]:
    """Parameters from the query string and a url-encoded or multipart form (form fields win), as text."""
    return dict(bottle.request.params.decode().items())


def content_disposition(name: str) -> str:
    """``attachment; filename=NAME`` with the name unquoted: PlatiPy's client takes all after 'filename='.

    A name that is not plain goes first as RFC 6266's ``filename*`` (which that split does not match),
    then as a plain fallback with ``_`` for each other character, last, where the split finds it.
    """
    if _PLAIN_NAME.match(name):
        return f"attachment; filename={name}"
    fallback = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return f"attachment; filename*=UTF-8''{urllib.parse.quote(name, safe='')}; filename={fallback}"


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while piece := fh.read(CHUNK):
            yield piece


def make_app(config: Config, index: Index, health: Health | None = None) -> bottle.Bottle:
    """The Bottle application of one Postbox (no global default app); ``health`` is the service's state."""
    app = bottle.Bottle(catchall=True)
    health = health or Health()
    store = Datasets(config, index)
    audit = AuditLog.beside(config.database)  # every access to patient data, one line (issue 9)
    app.install(_Translate(config))
    app.install(KeyAuth(index, lambda message: _error(401, message)))

    def route(path: str, method: str = "GET", **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return app.route(path, method=method, **options)

    @route("/api/health", auth=False)
    def health_check() -> Any:
        # Degraded still answers 200: a full disk is not cured by a restart, so a supervisor must not restart.
        problems = health.problems()
        return json_response({"status": "degraded" if problems else "ok", "problems": problems,
                              "service": "postbox", "version": VERSION, "max_upload_mb": config.http.max_upload_mb})

    @route("/metrics", auth=False)  # its own check: a site key, or an address on metrics.allowed_hosts (issue 11)
    def metrics() -> Any:
        return exposition(config, index, app.config.get("postbox.metrics"), _error)

    @route("/api/openapi.json")
    def openapi_document() -> Any:
        return json_response(openapi.document(config, VERSION))

    @route("/api/algorithm")
    def algorithms() -> Any:
        return json_response([{"name": a.name, "default_settings": a.default_settings} for a in config.algorithms])

    @route("/api/dicomlocation")
    def locations() -> Any:
        return json_response(store.records.locations(current_key()))

    @route("/api/dicomlocation", "POST")
    def add_location() -> Any:
        return json_response(store.records.add_location(current_key(), _fields()))

    @route("/api/dataset", "POST")
    def add_dataset() -> Any:
        return json_response(store.create(current_key(), _fields()))

    @route("/api/datasets")
    def datasets() -> Any:
        return json_response(store.listing(current_key()))

    @route("/api/dataset/<dataset_id>")
    def dataset(dataset_id: str) -> Any:
        return json_response(store.dataset(current_key(), _path_id(dataset_id, "dataset")))

    @route("/api/dataset/ready/<dataset_id>")
    def dataset_ready(dataset_id: str) -> Any:
        record = store.records.dataset(current_key(), _path_id(dataset_id, "dataset"))
        return json_response({"ready": store.records.ready(record)})

    @route("/api/dataset/<dataset_id>/preview")
    def dataset_preview(dataset_id: str) -> Any:
        # Issue 11: the contour preview of the dataset's latest run, audited as the download it is.
        key = current_key()
        path, record = store.records.preview_file(key, _path_id(dataset_id, "dataset"))
        audit.record("download", who=key.name, address=bottle.request.remote_addr, job=record.get("last_job"),
                     dataset=record["id"], series_uid=None)
        headers = {"Content-Type": "image/png", "Cache-Control": "no-cache", "Content-Length": str(path.stat().st_size),
                   "Content-Disposition": content_disposition(f"preview-{record['id']}.png")}
        return bottle.HTTPResponse(_file_chunks(path), 200, headers=headers)

    @route("/api/dataobject", "POST")
    def add_object() -> Any:
        environ = bottle.request.environ
        if not bottle.request.content_type.startswith("multipart/"):
            return json_response(store.add_object(current_key(), _fields(), None, store.uploads))
        # A key at its quota is refused before its body is read (BodyGuard drains or closes the rest).
        store.records.check_stored(current_key())
        work = store.uploads / secrets.token_hex(8)
        work.mkdir()
        try:
            chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
            length = None if chunked or not environ.get("CONTENT_LENGTH") else bottle.request.content_length
            upload = read_multipart(environ["wsgi.input"], environ.get("CONTENT_TYPE", ""), length, work,
                                    max_file=int(config.http.max_upload_mb * 1e6))
            fields = {**dict(bottle.request.query.decode().items()), **upload.fields}
            stored = store.add_object(current_key(), fields, upload, work)
            audit.record("upload", who=current_key().name, address=bottle.request.remote_addr,
                         dataset=stored["dataset_id"], series_uid=stored.get("series_instance_uid"))
            return json_response(stored)
        except ClientGone as exc:
            log.warning("http: upload abandoned, nothing kept: %s", exc)
            return _error(400, str(exc))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    @route("/api/dataobjects")
    def data_objects() -> Any:
        return json_response(store.objects(current_key()))

    @route("/api/dataobject/<object_id>")
    def data_object(object_id: str) -> Any:
        return json_response(store.object_json(current_key(), _path_id(object_id, "data object")))

    @route("/api/dataobject/<object_id>", "DELETE")
    def delete_object(object_id: str) -> Any:
        return json_response(store.records.delete_object(current_key(), _path_id(object_id, "data object")))

    @route("/api/dataobject/download/<object_id>")
    def download(object_id: str) -> Any:
        key, number = current_key(), _path_id(object_id, "data object")
        path, name = store.records.object_file(key, number)
        record = store.records.object_record(key, number)
        audit.record("download", who=key.name, address=bottle.request.remote_addr, job=record.get("job"),
                     dataset=record["dataset"], series_uid=record.get("series_instance_uid"))
        headers = {"Content-Type": "application/octet-stream", "Cache-Control": "no-cache"}
        if path.is_file():
            headers["Content-Length"] = str(path.stat().st_size)
            headers["Content-Disposition"] = content_disposition(name)
            return bottle.HTTPResponse(_file_chunks(path), 200, headers=headers)
        name = name if name.lower().endswith(".zip") else f"{name}.zip"
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        headers.update({"Content-Type": "application/zip", "Content-Disposition": content_disposition(name)})
        return bottle.HTTPResponse(zip_stream((p, p.relative_to(path).as_posix()) for p in files), 200,
                                   headers=headers)

    @route("/api/trigger", "POST")
    def trigger() -> Any:
        key = current_key()
        # Who sent it, for people reading job.yaml; what owns the job is job.yaml's ``owner``, the key's id.
        sender = {"http": bottle.request.remote_addr, "key": key.name, "key_id": key.tag}
        job_id = store.runs.trigger(key, _fields(), sender)
        return json_response({"poll": f"/api/status/{job_id}"})

    @route("/api/status/<job_id>")
    def status(job_id: str) -> Any:
        wait = _wait_ms(bottle.request.query.get("wait"), config.http.status_wait_ms)
        return json_response(store.runs.status(current_key(), job_id, wait=wait / 1000))

    def error_page(err: bottle.HTTPError) -> str:
        if err.status_code >= 500:
            log.error("http: %s %s: internal error\n%s", bottle.request.method, bottle.request.path,
                      err.traceback or err.body)
            message = "internal error in Postbox (see the service log)"
        else:
            message = err.body if isinstance(err.body, str) and err.body else err.status_line
        bottle.response.content_type = "application/json"
        return json.dumps({"error": message})

    for code in (400, 401, 403, 404, 405, 411, 413, 429, 500):
        app.error(code)(error_page)
    app.config["postbox.datasets"] = store
    install_dashboard(app, config, index, audit)  # the web pages at / (issue 11)
    return app


def _wait_ms(value: str | None, most: int) -> int:
    """A status request's ``wait`` in milliseconds: ``most`` (``http.status_wait_ms``) when not given, and never
    more; 0 answers at once. Anything but a whole number is refused (400)."""
    if value is None or value == "":
        return most
    if not (value.isascii() and value.isdigit()):
        raise InvalidInput(f"'wait' must be a whole number of milliseconds (0: answer at once), not '{value[:20]}'")
    return min(int(value), most)


def _path_id(value: str, what: str) -> int:
    """An id from the URL path: one that is not a number names nothing, so 404."""
    if not (value.isascii() and value.isdigit()):
        raise NotFound(f"{what} {value}")
    return int(value)
