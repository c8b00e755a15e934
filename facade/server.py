"""Serve the HTTP API with cheroot, a production-grade threaded WSGI server, beside the worker.

Why cheroot (CherryPy's server): it is threaded and pure Python (no build step), it streams request
bodies to the application as they arrive (so uploads are written once, memory flat), and it passes a
header named ``API_KEY`` on as ``HTTP_API_KEY``, which PlatiPy's clients need: Werkzeug 2.3+ and
gunicorn 22+ drop headers with underscores. Bottle's own development server is single-threaded.

What cheroot does not do, and is added here (issue 9):

- **The guard** (:class:`pipeline.guard.Guard`) stands in for cheroot's ``ConnectionManager``: cheroot
  hands every accepted socket straight to a worker thread and times only each ``recv``, so 16 silent
  connections, or slowloris, held every thread. A connection now waits in the guard's selector thread
  until its request line and headers are whole (``http.header_timeout``, ``http.max_header_kb``: 408 and
  431), an idle keep-alive too, and connections per address are capped (``http.max_connections_per_address``).
  A worker gets only a request it can parse at once, with the bytes the guard read given back first.
- **The body guard** answers 413 from Content-Length before any byte is read, reads a chunked body to any
  route but an upload itself, up to Bottle's in-memory limit (past it Bottle would spool it to the system
  temp folder), and after an early answer (401, 400, 413) reads and discards what is left of a body of
  moderate size, so the client gets the answer rather than a reset connection; beyond that it closes the
  connection instead of reading on (cheroot would read the rest in one piece, into memory).
"""

from __future__ import annotations

import io
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import bottle
from cheroot import wsgi
from cheroot.makefile import StreamReader, StreamWriter
from cheroot.server import HTTPConnection

from pipeline.config import Config
from pipeline.guard import Guard, Limits, Refusal
from pipeline.health import Health
from pipeline.index import Index
from pipeline.jobs import JobManifest
from pipeline.metrics import Metrics

from .app import make_app
from .datasets import Datasets
from .metrics import CountRequests
from .records import forget_jobs

log = logging.getLogger(__name__)

__all__ = ["HttpServer"]

# Any request but an upload: a few form fields, kept in memory. Bottle spools a body past its MEMFILE_MAX
# to the system temp folder, so no other body may be longer (issue 9: no body is written outside our folders).
FORM_LIMIT = bottle.BaseRequest.MEMFILE_MAX
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

    def read_up_to(self, size: int) -> bytes:
        """At most ``size`` bytes of the body: fewer only at its end."""
        parts: list[bytes] = []
        got = 0
        while got < size and (part := self.read(min(_CHUNK, size - got))):
            parts.append(part)
            got += len(part)
        return b"".join(parts)

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
    return (None if chunked else int(value) if value.isascii() and value.isdigit() else 0), chunked


class BodyGuard:
    """WSGI middleware: size limits on request bodies, and a clean end to a body the app did not read."""

    def __init__(self, app: Callable[..., Any], *, upload_limit: int) -> None:
        self.app = app
        self.upload_limit = upload_limit

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        length, chunked = _length(environ)
        body = _Input(environ["wsgi.input"], length, chunked)
        environ["wsgi.input"] = body
        # Only a multipart body to the upload route streams to disk (into the inbox); any other body is a
        # form, which Bottle reads whole.
        upload = environ["REQUEST_METHOD"] == "POST" and environ.get("PATH_INFO", "").rstrip("/") == "/api/dataobject" \
            and environ.get("CONTENT_TYPE", "").lower().startswith("multipart/")
        limit = self.upload_limit + MULTIPART_OVERHEAD if upload else FORM_LIMIT
        if chunked and not upload:
            # No length to refuse by: read it here, up to the limit, into memory. Bottle would read it
            # whole first, spooling what is past its in-memory limit to the system temp folder (issue 9).
            try:
                data = body.read_up_to(limit + 1)
            except (OSError, ValueError) as exc:  # the client went, stalled, or sent broken chunks
                return self._refuse(environ, start_response, body, "400 Bad Request",
                                    f"the chunked request body could not be read ({exc})", drain=False)
            if len(data) > limit:
                return self._refuse(environ, start_response, body, "413 Request Entity Too Large",
                                    f"the request body is over {_size(limit)}; requests other than uploads are "
                                    f"limited to {_size(limit)}", drain=False)  # no length: no telling how long
            # Handed on as a body of known length: already de-chunked by cheroot, so Bottle must not de-chunk.
            environ.pop("HTTP_TRANSFER_ENCODING", None)
            environ["CONTENT_LENGTH"] = str(len(data))
            body = _Input(io.BytesIO(data), len(data), False)
            environ["wsgi.input"] = body
        elif length is not None and length > limit:
            what = f"the upload limit is {self.upload_limit / 1e6:g} MB" if upload else \
                f"requests other than uploads are limited to {_size(limit)}"
            return self._refuse(environ, start_response, body, "413 Request Entity Too Large",
                                f"the request body is {_size(length)}; {what}")

        def finish_body(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            # Called by Bottle once the route is done: whatever of the body it left unread goes now.
            if not body.eof and not body.drain(DRAIN_LIMIT):
                headers = [*headers, ("Connection", "close")]
            return start_response(status, headers, exc_info)

        return self.app(environ, finish_body)

    @staticmethod
    def _refuse(environ: dict[str, Any], start_response: Callable[..., Any], body: _Input, status: str,
                message: str, *, drain: bool = True) -> Iterable[bytes]:
        log.warning("http: %s %s refused (%s): %s", environ["REQUEST_METHOD"], environ["PATH_INFO"],
                    status.split()[0], message)
        data = json.dumps({"error": message}).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
        if not (drain and body.drain(DRAIN_LIMIT)):
            headers.append(("Connection", "close"))
        start_response(status, headers)
        return [data]


def _size(n: int) -> str:
    return f"{n / 1e6:g} MB" if n >= 10**6 else f"{n / 1e3:g} kB"


class _Gateway(wsgi.Gateway_10):
    """cheroot's WSGI gateway, taking ``Connection: close`` from the application as an order to close."""

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if any(k.lower() == "connection" and v.lower() == "close" for k, v in headers):
            self.req.close_connection = True
            headers = [(k, v) for k, v in headers if k.lower() != "connection"]
        return super().start_response(status, headers, exc_info)


class _Source(socket.SocketIO):
    """A socket's raw reader that first gives back the bytes the guard already took off the socket."""

    def __init__(self, sock: socket.socket, mode: Any) -> None:
        super().__init__(sock, mode)
        self.pending = b""

    def readinto(self, b: Any) -> int | None:
        if self.pending:
            n = min(len(b), len(self.pending))
            b[:n] = self.pending[:n]
            self.pending = self.pending[n:]
            return n
        return super().readinto(b)


class _Reader(StreamReader):
    """cheroot's buffered socket reader over a :class:`_Source`: bytes can be given back to it and taken out."""

    def __init__(self, sock: socket.socket, mode: str = "rb", bufsize: int = io.DEFAULT_BUFFER_SIZE) -> None:
        self.source = _Source(sock, mode)
        super(StreamReader, self).__init__(self.source, bufsize)  # cheroot's own would make a plain SocketIO
        self.bytes_read = 0

    def give(self, data: bytes) -> None:
        """Read ``data`` first (what the guard read of the next request)."""
        self.source.pending = data + self.source.pending

    def take(self) -> bytes:
        """Everything read from the socket and not yet by the application; the reader is left empty."""
        with self._read_lock:  # type: ignore[attr-defined]
            # _pyio's BufferedReader, as cheroot's own has_data() reads it.
            data = bytes(self._read_buf[self._read_pos:]) + self.source.pending  # type: ignore[has-type]
            self._read_buf, self._read_pos = b"", 0
            self.source.pending = b""
        return data


def _makefile(sock: socket.socket, mode: str = "r", bufsize: int = io.DEFAULT_BUFFER_SIZE) -> Any:
    return _Reader(sock, mode, bufsize) if "r" in mode else StreamWriter(sock, mode, bufsize)


def _answer(status: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode("latin-1") + body


class _HttpGuard(Guard):
    """The guard in cheroot's server, in place of its ``ConnectionManager`` (``put``, ``run``, ``stop``, ``close``).

    A worker thread gets a connection only once its request line and headers are whole; an idle keep-alive
    connection comes back here (``put``) and waits for its next request the same way.
    """

    door = "http"
    can_add_keepalive_connection = True  # idle ones cost no thread here; the per-address cap bounds them

    def __init__(self, server: _Server, limits: Limits, *, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(server.socket, limits, tls=tls)
        self.server = server

    def opening_length(self, data: bytearray, seen: int) -> int | None:
        end = data.find(b"\r\n\r\n", max(0, seen - 3))
        return None if end < 0 else end + 4

    def too_long(self, data: bytearray) -> Refusal:
        limit = f"{self.limits.max_bytes / 1024:g} KiB"
        return Refusal(f"request line and headers over {limit} (http.max_header_kb)",
                       _answer("431 Request Header Fields Too Large",
                               f"the request line and headers are over {limit}, the limit"))

    def late(self, data: bytearray) -> bytes:
        if not data.strip():
            return b""  # an idle connection is closed without a word, as a keep-alive expires
        return _answer("408 Request Timeout",
                       f"the request line and headers did not arrive within {self.limits.timeout:g} s")

    def plain_answer(self) -> bytes:
        return _answer("400 Bad Request", "this port serves HTTPS only (http.tls): use https://")

    def hand_off(self, sock: socket.socket, peer: Any, data: bytes, token: Any) -> None:
        sock.settimeout(self.server.timeout)
        conn = token
        if conn is None:
            conn = self.server.ConnectionClass(self.server, sock, _makefile)
            conn.remote_addr, conn.remote_port = peer[0], peer[1]
            # cheroot adds these to each request's environ; its own TLS (ssl_adapter) is not used: the guard
            # makes the handshake, under its deadline, never in the accept thread.
            conn.ssl_env = {"wsgi.url_scheme": "https", "HTTPS": "on"} if self.tls is not None else {}
        conn.rfile.give(data)
        self.server.process_conn(conn)

    def put(self, conn: Any) -> None:
        """cheroot's worker is done with a request and keeps the connection: wait for the next one here."""
        self.watch(conn.socket, (conn.remote_addr, conn.remote_port), conn.rfile.take(), token=conn)

    def run(self, expiration_interval: float = 0.5) -> None:  # cheroot's signature; the guard keeps its own time
        super().run()


class _Connection(HTTPConnection):
    """cheroot's connection, telling the guard when it closes, so that its address's count goes down then."""

    def close(self) -> None:
        # Before the close, not after: its shutdown() lets other threads run, and the client, seeing the FIN,
        # may be connecting again before this thread gets on.
        guard = self.server._connections
        if isinstance(guard, _HttpGuard):
            guard.closed(self.socket)
        super().close()


class _Server(wsgi.Server):
    """cheroot's WSGI server with the guard in place of its connection manager (``prepare`` swaps them)."""

    ConnectionClass = _Connection

    def __init__(self, *args: Any, limits: Limits, tls: ssl.SSLContext | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.tls = tls
        self.max_request_header_size = limits.max_bytes  # cheroot's own count (413) stays, behind the guard

    def prepare(self) -> None:
        super().prepare()
        self._connections.close()  # type: ignore[has-type]  # cheroot's own: it holds nothing yet
        self._connections = _HttpGuard(self, self.limits, tls=self.tls)


class HttpServer:
    """The HTTP door of one service: cheroot serving the Bottle app, the retrieval of the series datasets
    ask for, and the sweep of expired datasets. A :class:`~pipeline.doors.Door`."""

    name = "http"

    def __init__(self, config: Config, index: Index, health: Health | None = None, *,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        h = config.http
        self.app = make_app(config, index, health)
        self.datasets: Datasets = self.app.config["postbox.datasets"]
        # The service's registry (issue 11), served at GET /metrics; a door made on its own keeps one of its own.
        self.metrics = metrics or Metrics(config, index)
        self.app.config["postbox.metrics"] = self.metrics
        # Counted outside the body guard, so that its refusals (413) are counted too.
        guarded = CountRequests(BodyGuard(self.app, upload_limit=int(h.max_upload_mb * 1e6)), self.metrics)
        limits = Limits(timeout=h.header_timeout, max_bytes=int(h.max_header_kb * 1024),
                        max_per_address=h.max_connections_per_address)
        tls = config.tls_files().get("http.tls")
        self.scheme = "https" if tls is not None else "http"
        # With TLS on, the port speaks only TLS: a plain HTTP request fails the handshake and is closed.
        self.server = _Server((h.host, h.port), guarded, numthreads=h.threads, max=h.threads,
                              server_name="postbox", timeout=60, request_queue_size=128, limits=limits,
                              tls=tls.server_context() if tls is not None else None)
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
        self.datasets.start()
        log.info("http: listening on %s://%s:%d (cheroot, %d threads, uploads up to %g MB)",
                 self.scheme, self.config.http.host, self.port, self.config.http.threads,
                 self.config.http.max_upload_mb)

    def _sweep(self) -> None:
        while True:
            try:
                self.datasets.sweep()
            except Exception:
                log.exception("http: sweeping expired datasets failed; trying again later")
            if self._stop.wait(self.config.http.sweep_seconds):
                return

    def stop(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        self._stop.set()
        self.datasets.runs.close()  # waiting status requests answer now: cheroot waits for its threads
        self.server.stop()
        self.datasets.stop(timeout)
        for t in self._threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        log.info("http: stopped")

    def on_ready(self) -> None:
        """Nothing: this door serves from its start."""

    def on_job_finished(self, manifest: JobManifest) -> None:
        """A run's outputs become its dataset's data objects as it finishes, not on the client's next read;
        status requests waiting for a job are woken (issue 10)."""
        self.datasets.job_finished(manifest)

    def attach_series(self, series_uid: str, folder: Path, sender: dict[str, Any]) -> bool:
        """The DICOM node's claimer: a series a dataset waits for (SEND or MOVE) goes to that dataset."""
        return self.datasets.attach_series(series_uid, folder, sender)

    def forget_jobs(self, job_ids: list[str]) -> None:
        """Retention's hook: jobs removed from the outbox leave no dataset or data object behind (issue 11)."""
        forget_jobs(self.datasets.index, job_ids)

    def ready_info(self) -> dict[str, Any] | None:
        return {"port": self.port, "scheme": self.scheme}
