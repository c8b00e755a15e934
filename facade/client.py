"""A Python client for Postbox's HTTP API with PlatiPy's verbs (``PlatiPyClient``'s methods and meanings).

Differences from PlatiPy's client, each a fix: errors raise :class:`ClientError` with the server's message
instead of returning None or being logged; a run that fails raises :class:`AlgorithmFailed` instead of
ending quietly; the status request waits on the server for the run to end (PlatiPy sleeps a fixed second
between polls; against a server that answers at once, status is polled from 20 ms up); uploads are streamed from
disk instead of built in memory; downloads go to a temporary name and are renamed when whole; uploads and
downloads show a progress bar when stderr is a terminal. It needs only ``requests`` and ``tqdm``.

Example::

    client = Client("127.0.0.1", 8000, api_key, "body-lungs")
    dataset = client.add_dataset()
    client.add_data_object(dataset, file_path="ct.nii.gz")
    for status in client.run_algorithm(dataset, config=client.get_default_settings()):
        print(status)
    client.download_output_objects(dataset, output_path="out")
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sys
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import requests

from ._zipstream import CHUNK, zip_stream

log = logging.getLogger(__name__)

__all__ = ["AlgorithmFailed", "Client", "ClientError"]

Ref = dict[str, Any] | int | str  # a record as returned by the server, or its id
# An unfinished status answered faster than this was not held for the run (a server that does not wait, or
# one whose waiters are all busy): the client then waits between polls itself.
_HELD = 0.1


class ClientError(Exception):
    """The server refused a request (``status`` is its HTTP code, None if it could not be reached)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(f"{message} (HTTP {status})" if status else message)
        self.message = message
        self.status = status

    def __reduce__(self):  # keep fields across process boundaries
        return (type(self), (self.message, self.status))


class AlgorithmFailed(ClientError):
    """A run ended in FAILURE; ``state`` is the last status, whose ``status`` holds the error."""

    def __init__(self, message: str, state: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.state = state or {}

    def __reduce__(self):
        return (type(self), (self.message, self.state))


def _id(ref: Ref) -> Any:
    return ref["id"] if isinstance(ref, dict) else ref


def _progress(total: int | None, what: str, enabled: bool | None) -> Any:
    """A tqdm bar on stderr when it is a terminal (or when asked); None otherwise."""
    if enabled is False or (enabled is None and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def _head(boundary: str, fields: dict[str, str], file_name: str, content_type: str) -> bytes:
    """The form fields and the file part's header of a multipart body."""
    quoted = file_name.replace("\\", "\\\\").replace('"', '\\"')
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file_data"; filename="{quoted}"\r\n'
                 f"Content-Type: {content_type}\r\n\r\n")
    return "".join(parts).encode("utf-8")


class _Body:
    """A multipart/form-data body streamed from a file: requests sends it with Content-Length, 1 MiB a write."""

    def __init__(self, fields: dict[str, str], file_name: str, path: Path, bar: Any) -> None:
        boundary = secrets.token_hex(16)
        self.content_type = f"multipart/form-data; boundary={boundary}"
        self.head = _head(boundary, fields, file_name, "application/octet-stream")
        self.tail = f"\r\n--{boundary}--\r\n".encode()
        self.path = path
        self.size = path.stat().st_size
        self.bar = bar

    def __len__(self) -> int:
        return len(self.head) + self.size + len(self.tail)

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        with open(self.path, "rb") as fh:
            while piece := fh.read(CHUNK):
                if self.bar is not None:
                    self.bar.update(len(piece))
                yield piece
        yield self.tail


def _streamed(fields: dict[str, str], file_name: str, chunks: Iterable[bytes], bar: Any) -> tuple[str, Iterator[bytes]]:
    """A multipart body of unknown length (sent chunked), for a zip made on the fly."""
    boundary = secrets.token_hex(16)

    def body() -> Iterator[bytes]:
        yield _head(boundary, fields, file_name, "application/zip")
        for piece in chunks:
            if bar is not None:
                bar.update(len(piece))
            yield piece
        yield f"\r\n--{boundary}--\r\n".encode()

    return f"multipart/form-data; boundary={boundary}", body()


def _download_name(disposition: str, fallback: str) -> str:
    """The file name of a Content-Disposition header, reduced to one safe path component."""
    name = fallback
    star = re.search(r"filename\*=UTF-8''([^;]+)", disposition, re.I)
    plain = re.search(r'filename=("(?:[^"\\]|\\.)*"|[^;]+)', disposition, re.I)
    if star:
        name = urllib.parse.unquote(star.group(1).strip())
    elif plain:
        name = plain.group(1).strip().strip('"')
    name = name.replace("\\", "/").rsplit("/", 1)[-1].lstrip(".").strip()
    return name or fallback


class Client:
    """A session with one Postbox service for one algorithm (PlatiPy's ``PlatiPyClient``).

    Parameters
    ----------
    host, port
        Where the service listens.
    api_key
        A key made with ``postbox manage key --add NAME`` on the server.
    algorithm_name
        The algorithm to run: its exact name, or a part of it that names just one (as PlatiPy's client
        finds its default settings).
    verify
        A CA certificate file: the service is then reached over https and its certificate checked.
    progress
        Progress bars for uploads and downloads: None shows them when stderr is a terminal.

    Raises
    ------
    ClientError
        The service cannot be reached, the key is refused, or no algorithm has that name.
    FileNotFoundError
        ``verify`` names no file.
    """

    def __init__(self, host: str, port: int, api_key: str, algorithm_name: str, verify: str | None = None, *,
                 progress: bool | None = None, timeout: float = 60.0) -> None:
        if verify is not None and not os.path.exists(verify):
            raise FileNotFoundError(f"CA certificate file not found: {verify}")
        self.base_url = f"{'https' if verify else 'http'}://{host}:{port}"
        self.api_key = api_key
        self.verify = verify
        self.progress = progress
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["API_KEY"] = api_key
        names = [a["name"] for a in self._json("GET", "/api/algorithm")]
        matches = [n for n in names if n == algorithm_name] or [n for n in names if algorithm_name in n]
        if len(matches) != 1:
            what = "no algorithm" if not matches else f"{len(matches)} algorithms"
            raise ClientError(f"{what} named like '{algorithm_name}' on {self.base_url} (known: {', '.join(names)})")
        self.algorithm_name = matches[0]
        self._upload_limit: float | None = None

    # -- plumbing --

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        if self.verify:
            # Per request, not on the session: requests lets $REQUESTS_CA_BUNDLE override a session's verify.
            kwargs.setdefault("verify", self.verify)
        try:
            res = self.session.request(method, self.base_url + path, **kwargs)
        except requests.RequestException as exc:
            raise ClientError(f"{method} {path}: {self.base_url} cannot be reached ({exc})") from None
        if res.status_code >= 400:
            try:
                body = res.json()
                message = body.get("error") or body.get("Error") or body.get("message") or res.text
            except ValueError:
                message = res.text.strip() or res.reason
            raise ClientError(f"{method} {path}: {message}", res.status_code)
        return res

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- DICOM locations --

    def get_dicom_location(self, name: str) -> dict[str, Any] | None:
        """The DICOM location called ``name``, or None if there is none."""
        return next((loc for loc in self._json("GET", "/api/dicomlocation") if loc["name"] == name), None)

    def add_dicom_location(self, name: str, host: str, port: int, ae_title: str | None = None) -> dict[str, Any]:
        """Add a DICOM location (or return the one of that name)."""
        existing = self.get_dicom_location(name)
        if existing is not None:
            return existing
        params: dict[str, Any] = {"name": name, "host": host, "port": port}
        if ae_title:
            params["ae_title"] = ae_title
        return dict(self._json("POST", "/api/dicomlocation", data=params))

    # -- datasets --

    def get_dataset(self, dataset: Ref) -> dict[str, Any]:
        """The dataset, with the outputs of its latest run."""
        return dict(self._json("GET", f"/api/dataset/{_id(dataset)}"))

    def get_dataset_ready(self, dataset: Ref) -> bool:
        """Whether every input of the dataset has arrived."""
        return bool(self._json("GET", f"/api/dataset/ready/{_id(dataset)}")["ready"])

    def add_dataset(self, from_dicom_location: Ref | None = None, to_dicom_location: Ref | None = None,
                    timeout: float | None = None) -> dict[str, Any]:
        """A new dataset; ``timeout`` is how many hours the server keeps it after its last use (default 24)."""
        params: dict[str, Any] = {}
        if from_dicom_location:
            params["from_dicom_location"] = _id(from_dicom_location)
        if to_dicom_location:
            params["to_dicom_location"] = _id(to_dicom_location)
        if timeout:
            params["timeout"] = timeout
        return dict(self._json("POST", "/api/dataset", data=params))

    def add_data_object(self, dataset: Ref, series_uid: str | None = None, parent: Ref | None = None,
                        meta_data: dict[str, Any] | None = None, dicom_retrieve: str | None = None,
                        file_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Add an input to a dataset: a file (``file_path``; a folder is zipped as a DICOM series), or a DICOM
        series the server retrieves (``series_uid`` and ``dicom_retrieve``: SEND, MOVE or GET)."""
        params: dict[str, str] = {"dataset": str(_id(dataset))}
        if parent:
            params["parent"] = str(_id(parent))
        if meta_data:
            params["meta_data"] = json.dumps(meta_data)
        if series_uid or dicom_retrieve:
            if not (series_uid and dicom_retrieve):
                raise ClientError("a DICOM data object needs both series_uid and dicom_retrieve")
            if file_path is None:
                params.update(type="DICOM", seriesUID=series_uid, dicom_retrieve=dicom_retrieve)
                return dict(self._json("POST", "/api/dataobject", data=params))
        if file_path is None:
            raise ClientError("give file_path (a file, or a DICOM series folder), or series_uid and dicom_retrieve")
        path = Path(file_path)
        if path.is_dir():
            return self.add_dicom_folder(dataset, path, parent=parent, meta_data=meta_data)
        params.update(type="FILE", file_name=path.name)
        self._check_size(path.stat().st_size, path)
        bar = _progress(path.stat().st_size, f"upload {path.name}", self.progress)
        try:
            body = _Body(params, path.name, path, bar)
            return dict(self._json("POST", "/api/dataobject", data=body,
                                   headers={"Content-Type": body.content_type}, timeout=None))
        finally:
            if bar is not None:
                bar.close()

    def add_dicom_folder(self, dataset: Ref, folder: str | os.PathLike[str], *, parent: Ref | None = None,
                         meta_data: dict[str, Any] | None = None) -> dict[str, Any]:
        """Add a DICOM series from a folder, zipped on the fly (nothing written to disk, sent chunked)."""
        folder = Path(folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ClientError(f"{folder}: no files to send")
        total = sum(p.stat().st_size for p in files)
        self._check_size(total, folder)
        params: dict[str, str] = {"dataset": str(_id(dataset)), "type": "DICOM", "file_name": f"{folder.name}.zip"}
        if parent:
            params["parent"] = str(_id(parent))
        if meta_data:
            params["meta_data"] = json.dumps(meta_data)
        bar = _progress(None, f"upload {folder.name}/ (zip)", self.progress)
        try:
            content_type, body = _streamed(params, params["file_name"],
                                           zip_stream(((p, p.relative_to(folder).as_posix()) for p in files),
                                                      compress=True), bar)
            return dict(self._json("POST", "/api/dataobject", data=body, headers={"Content-Type": content_type},
                                   timeout=None))
        finally:
            if bar is not None:
                bar.close()

    def _check_size(self, size: int, what: Path) -> None:
        """Refuse before sending what the server would refuse after (its limit is in /api/health)."""
        if self._upload_limit is None:
            self._upload_limit = float(self._json("GET", "/api/health").get("max_upload_mb", 0)) * 1e6
        if self._upload_limit and size > self._upload_limit:
            raise ClientError(f"{what} is {size / 1e6:g} MB; the server accepts uploads up to "
                              f"{self._upload_limit / 1e6:g} MB", 413)

    # -- runs --

    def get_default_settings(self) -> dict[str, Any]:
        """The algorithm's default settings (the keys a run's config may have)."""
        for algorithm in self._json("GET", "/api/algorithm"):
            if algorithm["name"] == self.algorithm_name:
                return dict(algorithm["default_settings"])
        raise ClientError(f"the server no longer has algorithm '{self.algorithm_name}'", 404)

    def run_algorithm(self, dataset: Ref, config: dict[str, Any] | None = None, *, wait: bool = True,
                      poll: float = 0.02, max_poll: float = 1.0) -> Iterator[dict[str, Any]]:
        """Run the algorithm on the dataset and yield its status each time it changes, the final one included.

        With ``wait``, each status request is held by the server until the run ends (or ``http.status_wait_ms``
        pass) and the next one follows at once. An answer that comes back unfinished at once (``wait=False``,
        which sends ``?wait=0``, a server that does not wait, or one with all its waiters busy) is followed
        by the next after ``poll`` seconds, then half as long again each time, up to ``max_poll``.

        Raises
        ------
        AlgorithmFailed
            When the run ends in FAILURE (its status holds the error).
        """
        params: dict[str, Any] = {"dataset": _id(dataset), "algorithm": self.algorithm_name}
        if config:
            params["config"] = json.dumps(config)
        poll_url = self._json("POST", "/api/trigger", data=params)["poll"]
        if not wait:
            poll_url += "?wait=0"
            time.sleep(poll)  # a job is never done the instant it is triggered: wait one interval first
        last: dict[str, Any] | None = None
        pause = poll
        while True:
            start = time.monotonic()
            state = self._json("GET", poll_url)
            held = time.monotonic() - start >= _HELD
            if state != last:
                if state.get("state") == "FAILURE":
                    raise AlgorithmFailed(f"{self.algorithm_name} failed: {state.get('status')}", state)
                yield state
                last = state
            if state.get("state") in (None, "SUCCESS"):
                return
            if not held:  # answered at once, unfinished: the server did not wait, so this side does
                time.sleep(pause)
                pause = min(max_poll, pause * 1.5)

    def download_output_objects(self, dataset: Ref, output_path: str | os.PathLike[str] = ".") -> list[Path]:
        """Download the outputs of the dataset's latest run into ``output_path``; returns the files written."""
        out = Path(output_path)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for obj in self.get_dataset(dataset)["output_data_objects"]:
            written.append(self.download_object(obj, out))
        return written

    def download_object(self, data_object: Ref, output_path: str | os.PathLike[str] = ".") -> Path:
        """Download one data object into ``output_path`` (a temporary name until whole); returns the file."""
        res = self._request("GET", f"/api/dataobject/download/{_id(data_object)}", stream=True)
        with res:
            name = _download_name(res.headers.get("Content-Disposition", ""), f"object-{_id(data_object)}")
            dest = Path(output_path) / name
            part = dest.with_name(f".{name}.{secrets.token_hex(4)}.part")
            size = int(res.headers.get("Content-Length", 0)) or None
            bar = _progress(size, f"download {name}", self.progress)
            try:
                with open(part, "wb") as fh:
                    for piece in res.iter_content(CHUNK):
                        fh.write(piece)
                        if bar is not None:
                            bar.update(len(piece))
                os.replace(part, dest)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
            finally:
                if bar is not None:
                    bar.close()
        return dest
