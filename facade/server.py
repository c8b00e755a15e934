"""Serve the HTTP API with cheroot, a production-grade threaded WSGI server, beside the worker.

Why cheroot (CherryPy's server): it is threaded and pure Python (no build step), it streams request
bodies to the application as they arrive (so uploads are written once, memory flat), and it passes a
header named ``API_KEY`` on as ``HTTP_API_KEY``, which PlatiPy's clients need: Werkzeug 2.3+ and
gunicorn 22+ drop headers with underscores. Bottle's own development server is single-threaded.

Two small additions make refusals reliable: the body guard answers 413 from Content-Length before any
byte is read, and after an early answer (401, 400, 413) it reads and discards what is left of a body of
moderate size, so the client gets the answer rather than a reset connection; beyond that it closes the
connection instead of reading on (cheroot would read the rest in one piece, into memory).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from cheroot import wsgi

from pipeline.config import Config
from pipeline.health import Health
from pipeline.index import Index

from .app import make_app
from .datasets import Datasets

log = logging.getLogger(__name__)

__all__ = ["HttpServer"]

FORM_LIMIT = 10**6  # any request but an upload: a few form fields
MULTIPART_OVERHEAD = 10**6  # the fields and boundaries around an upload's file
DRAIN_LIMIT = 16 << 20  # read and discard at most this much of a refused body, then close instead
_CHUNK = 1 << 16


class _Input:
    """The request body as the application sees it, counting what was read."""

    def __init__(self, raw: Any, length: int | None, chunked: bool) -> None:
        self.raw = raw
        self.remaining = length if length is not None else 0
        self.chunked = chunked
        self.eof = not chunked and self.remaining == 0

    def read(self, size: int = -1) -> bytes:
        if self.eof:
            return b""
        if not self.chunked:
            size = self.remaining if size is None or size < 0 else min(size, self.remaining)
        data: bytes = self.raw.read(size)
        if not self.chunked:
            self.remaining -= len(data)
        if not data or (not self.chunked and self.remaining <= 0):
            self.eof = True
        return data

    def readline(self, size: int = -1) -> bytes:  # Bottle's own form parsing uses it
        data: bytes = self.raw.readline(size)
        if not self.chunked:
            self.remaining -= len(data)
        if not data or (not self.chunked and self.remaining <= 0):
            self.eof = True
        return data

    def drain(self, limit: int) -> bool:
        """Discard the rest of the body if it is at most ``limit`` bytes; whether it is all gone."""
        if not self.chunked and self.remaining > limit:
            return False
        read = 0
        try:
            while not self.eof and read <= limit:
                read += len(self.read(_CHUNK))
        except OSError:
            return False
        return self.eof


def _length(environ: dict[str, Any]) -> tuple[int | None, bool]:
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    value = environ.get("CONTENT_LENGTH") or ""
    return (None if chunked else int(value) if value.isdigit() else 0), chunked


class BodyGuard:
    """WSGI middleware: size limits on request bodies, and a clean end to a body the app did not read."""

    def __init__(self, app: Callable[..., Any], *, upload_limit: int) -> None:
        self.app = app
        self.upload_limit = upload_limit

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        length, chunked = _length(environ)
        body = _Input(environ["wsgi.input"], length, chunked)
        environ["wsgi.input"] = body
        upload = environ["REQUEST_METHOD"] == "POST" and environ.get("PATH_INFO", "").rstrip("/") == "/api/dataobject"
        limit = self.upload_limit + MULTIPART_OVERHEAD if upload else FORM_LIMIT
        if length is not None and length > limit:
            what = f"the upload limit is {self.upload_limit / 1e6:g} MB" if upload else \
                f"requests other than uploads are limited to {limit / 1e6:g} MB"
            log.warning("http: %s %s refused (413): %d bytes; %s", environ["REQUEST_METHOD"], environ["PATH_INFO"],
                        length, what)
            data = json.dumps({"error": f"the request body is {length / 1e6:g} MB; {what}"}).encode()
            headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
            if not body.drain(DRAIN_LIMIT):
                headers.append(("Connection", "close"))
            start_response("413 Request Entity Too Large", headers)
            return [data]

        def finish_body(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            # Called by Bottle once the route is done: whatever of the body it left unread goes now.
            if not body.eof and not body.drain(DRAIN_LIMIT):
                headers = [*headers, ("Connection", "close")]
            return start_response(status, headers, exc_info)

        return self.app(environ, finish_body)


class _Gateway(wsgi.Gateway_10):
    """cheroot's WSGI gateway, taking ``Connection: close`` from the application as an order to close."""

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if any(k.lower() == "connection" and v.lower() == "close" for k, v in headers):
            self.req.close_connection = True
            headers = [(k, v) for k, v in headers if k.lower() != "connection"]
        return super().start_response(status, headers, exc_info)


class HttpServer:
    """The HTTP door of one service: cheroot serving the Bottle app, and the sweep of expired datasets."""

    def __init__(self, config: Config, index: Index, health: Health | None = None) -> None:
        self.config = config
        h = config.http
        self.app = make_app(config, index, health)
        self.datasets: Datasets = self.app.config["postbox.datasets"]
        guarded = BodyGuard(self.app, upload_limit=int(h.max_upload_mb * 1e6))
        self.server = wsgi.Server((h.host, h.port), guarded, numthreads=h.threads, max=h.threads,
                                  server_name="postbox", timeout=60, request_queue_size=64)
        self.server.gateway = _Gateway
        self.server.error_log = self._error_log  # type: ignore[method-assign]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.port = h.port

    def _error_log(self, msg: str = "", level: int = logging.INFO, traceback: bool = False) -> None:
        log.log(max(level, logging.DEBUG), "http: %s", msg, exc_info=traceback)

    def start(self) -> None:
        """Bind (OSError if the address is taken) and serve in background threads."""
        self.server.prepare()
        self.port = self.server.bind_addr[1]
        self._threads = [threading.Thread(target=self.server.serve, name="http"),
                         threading.Thread(target=self._sweep, name="http-sweep")]
        for t in self._threads:
            t.start()
        log.info("http: listening on http://%s:%d (cheroot, %d threads, uploads up to %g MB)",
                 self.config.http.host, self.port, self.config.http.threads, self.config.http.max_upload_mb)

    def _sweep(self) -> None:
        while True:
            try:
                self.datasets.sweep()
            except Exception:
                log.exception("http: sweeping expired datasets failed; trying again later")
            if self._stop.wait(self.config.http.sweep_seconds):
                return

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.server.stop()
        for t in self._threads:
            t.join(timeout=timeout)
        log.info("http: stopped")
