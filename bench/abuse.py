"""Benchmark of both doors under abuse without a key (issue 9, section 2; not a test).

Run it as ``python bench/abuse.py`` from the repository (``--only http`` or ``--only dicom`` for one half,
``--help`` for the rest; the whole run takes about 1.5 minutes). It prints one Markdown table: each
attack, the figure it gives against Postbox, the target, PASS/MISS, and the same attack against the
libraries as they come (the reference), in the same run. It returns 1 if something went wrong (a service
that did not start, an attack that raised, an ERROR in a service log), not for a MISS.

Postbox is a real service, ``python -m facade.cli --config CFG manage run`` in a temp folder with
PYTHONPATH set to this checkout, its port taken from its ready file (``inbox/.services/*.json``), stopped
with SIGTERM. One service has the HTTP door on (``http.header_timeout`` 30 s, longer than any attack here,
and ``http.max_connections_per_address`` 100, so that every attacking connection is really held by the
guard, not refused), one the DICOM node (``dicom.associate_timeout`` 15 s and
``dicom.max_connections_per_address`` 64 for the same reason, ``allowed_ae_titles`` ECHOSCU and
STORESCU, ``max_instance_mb`` 64). Attackers connect from 127.0.0.2 and 127.0.0.3 (all of 127/8 is this
machine), so the per-address cap that stops them does not stop a probe from 127.0.0.1. A service's memory
is its own RSS from ``/proc/<pid>/status``: ``VmHWM`` (the peak, reset by ``clear_refs`` just before the
attack) minus ``VmRSS`` before it, and a 10 ms sampler in case the reset is not allowed. MB here is 2^20 bytes.

The references run in this process, in threads: a plain ``cheroot.wsgi.Server`` (16 threads,
``numthreads=16, max=16, timeout=60``) serving a tiny Bottle app (``/api/health``; ``POST /api/dataset``
reading ``request.forms``; ``POST /api/dataobject`` opening the uploaded zip with ``zipfile`` and refusing it
past 10,000 entries, as Postbox did), and a plain pynetdicom ``AE`` (``maximum_associations=10``,
``maximum_pdu_size=0``, Verification and CT Image Storage, a C-STORE handler reading a few attributes of
``event.dataset``, as the node did). Their memory is this process's own RSS growth, measured the same way
after ``gc.collect()`` and ``malloc_trim``. Where the attack would cost the reference too much memory it is
scaled down, and the row says so: one 100 MB header instead of four, one deflate bomb (and a 256 MiB one
instead of 1 GiB if less than 8 GiB of memory is available).

The figures:

- **HTTP, threads.** 64 silent connections (127.0.0.2) and 32 slowloris ones (127.0.0.3, one byte a second
  of an endless header each) are opened; then ``/api/health`` is probed from 127.0.0.1, each probe on a new
  connection with a 2 s timeout, until the trickle has sent 4 bytes and 20 probes were made, or for
  ``--probe-window`` seconds (10) at most. Figure: the share answered 200 within 2 s (target >= 90%), and
  how many attacking connections were still open (held) at the end.
- **HTTP, huge headers.** Four connections (one for the reference) each send a request whose header
  ``X-Big`` is 100 MB long, then read the answer (5 s). Figure: the RSS growth (target < 100 MB) and what
  each client got: ``431``, ``closed``/``reset`` (both acceptable) or ``no answer``.
- **HTTP, chunked form body.** ``POST /api/dataset`` with a key, ``Transfer-Encoding: chunked`` and a form
  body of 50 MB (chunked twice, as in ``tests/test_abuse_http.py``: cheroot takes off one layer, Bottle
  took off the other), with the service's ``TMPDIR`` (the reference's ``tempfile.tempdir``) set to a
  folder of its own. Figure: bytes written there, from the sizes of the files the process has open in it
  (``/proc/<pid>/fd``, polled every 5 ms; Bottle's ``TemporaryFile`` has no name) and of the files in it
  (target 0), the answer (413), and any file opened outside the service's folders meanwhile.
- **HTTP, zip central directory.** A 17 MB zip of 200,000 empty entries (its central directory is the
  bomb) uploaded to ``POST /api/dataobject``. Figure: RSS growth (``tests/test_abuse_http.py``'s bound,
  < 20 MB) and the answer (413 naming the entries).
- **DICOM, silent sockets.** 40 silent connections (127.0.0.2), then dcmtk's ``echoscu -aet ECHOSCU``
  (``TCP_NODELAY=1``) from 127.0.0.1, again every 0.5 s until it is answered, for ``--echo-window`` seconds
  (35: the reference's ARTIM timer closes its silent sockets after 30 s). Figure: the time until the first
  C-ECHO answered (target < 5 s), and how many silent sockets were still held.
- **DICOM, PDU declaring 4 GiB.** An A-ASSOCIATE-RQ whose header declares 4 GiB (before any AE title is
  checked), then up to 200 MB of zeros; and, in an association of an allowed AE, a P-DATA-TF declaring
  4 GiB, then 200 MB. Figure: how much was taken before the association was aborted (the tests' bound is
  64 MB), what the client got, and the RSS growth (the tests' bound, < 50 MB).
- **DICOM, deflate bomb.** A CT instance whose private element is 1 GiB of zeros, deflated to 1 MB (built
  once, streamed, as in ``tests/test_abuse_dicom.py``), sent by pynetdicom as it is on disk. Figure: the
  C-STORE status (target 0xA700, over ``dicom.max_instance_mb`` 64) and the RSS growth (target < 200 MB).
  A second row gives the same bomb to a second service with the default limits (``max_instance_mb`` 2048 MB
  would allow 1 GiB; ``max_deflate_ratio`` 200 refuses an instance inflating 1,000 times): 0xA700 and
  nothing stored.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# bench/ holds http.py: take this folder off sys.path so ``import http`` (requests needs it) is the stdlib's.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import bottle  # noqa: E402
import pydicom  # noqa: E402
import requests  # noqa: E402
import yaml  # noqa: E402
from cheroot import wsgi  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.filebase import DicomBytesIO  # noqa: E402
from pydicom.filewriter import write_dataset, write_file_meta_info  # noqa: E402
from pydicom.uid import DeflatedExplicitVRLittleEndian  # noqa: E402
from pynetdicom import AE, _config, evt  # noqa: E402
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]  # noqa: E402

from pipeline import phantom  # noqa: E402
from pipeline.index import Index  # noqa: E402
from pipeline.service import ReadyFile  # noqa: E402

MB = 1 << 20
GiB = 1 << 30
ECHOSCU = "/usr/bin/echoscu"  # by absolute path: a Python package may put a script of that name on PATH
DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")  # Debian's dcmtk leaves Nagle on otherwise and crawls
OUT_OF_RESOURCES = 0xA700
PROBE = "127.0.0.1"
ATTACKERS = ("127.0.0.2", "127.0.0.3")
NOOP = "def noop(data_objects, working_dir, settings):\n    return []\n"
REFERENCE_ZIP_ENTRIES = 10_000  # the reference app's entry limit, checked after zipfile parsed the zip
SAFE_AVAILABLE = 8 * GiB  # below this much available memory the reference gets a smaller deflate bomb


# --- memory -------------------------------------------------------------------------------------------


def proc_status(pid: int | str, key: str) -> int:
    """A ``/proc/<pid>/status`` figure (``VmRSS``, ``VmHWM``) in bytes; ``pid`` may be ``"self"``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(f"{key} not in /proc/{pid}/status")


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _trim() -> None:
    """Give this process's freed memory back to the system, so that a reference's growth is its own."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Memory:
    """The peak RSS growth of a process while the ``with`` block runs (``pid`` None: this process)."""

    def __init__(self, pid: int | None = None, settle: float = 0.0) -> None:
        self.pid: int | str = "self" if pid is None else pid
        self.settle = settle  # seconds to go on sampling after the block: what the server does once the client left
        self.before = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.reset = False

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            with contextlib.suppress(OSError, KeyError):
                self.peak = max(self.peak, proc_status(self.pid, "VmRSS"))

    def __enter__(self) -> Memory:
        if self.pid == "self":
            _trim()
        try:  # VmHWM back to the current RSS (Linux 4.0+, same user)
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.before = self.peak = proc_status(self.pid, "VmRSS")
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        time.sleep(self.settle)
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError, KeyError):
            self.peak = max(self.peak, proc_status(self.pid, "VmRSS"))
            if self.reset:
                self.peak = max(self.peak, proc_status(self.pid, "VmHWM"))

    @property
    def grown(self) -> int:
        return self.peak - self.before


def mb(n: float) -> str:
    return f"{n / MB:,.0f} MB" if abs(n) >= 10 * MB else f"{n / MB:.1f} MB"


# --- sockets -------------------------------------------------------------------------------------------


def connect(port: int, source: str = ATTACKERS[0], timeout: float = 5) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))


def is_open(sock: socket.socket) -> bool:
    """Whether the server has neither closed nor reset the connection (nothing is consumed)."""
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)


def reply(sock: socket.socket, timeout: float) -> tuple[str, bytes]:
    """What the server says within ``timeout``: ("data", its first bytes), or ("closed"|"reset"|"no answer", b"")."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return f"no answer in {timeout:g} s", b""
    except ConnectionResetError:
        return "reset", b""
    except OSError as exc:
        return f"error ({exc.strerror or exc})", b""
    return ("data", data) if data else ("closed", b"")


def http_answer(sock: socket.socket, timeout: float = 5) -> str:
    """An HTTP answer's status code, or what happened instead."""
    what, data = reply(sock, timeout)
    if what != "data":
        return what
    parts = data.split(b" ", 2)
    return parts[1].decode("ascii", "replace") if len(parts) > 1 else repr(data[:20])


class Sockets:
    """Connections opened by an attack, all closed at the end of the ``with`` block."""

    def __init__(self) -> None:
        self.all: list[socket.socket] = []

    def open(self, port: int, source: str) -> socket.socket:
        sock = connect(port, source)
        self.all.append(sock)
        return sock

    def __enter__(self) -> Sockets:
        return self

    def __exit__(self, *exc: Any) -> None:
        for sock in self.all:
            sock.close()


class Trickle:
    """Slowloris: one byte of an endless request header a second on each socket, in a thread of its own."""

    def __init__(self, socks: list[socket.socket]) -> None:
        self.socks = socks
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slowloris", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        header = b"GET /api/health HTTP/1.1\r\nHost: postbox\r\nX-Padding: " + b"a" * 100_000
        while not self._stop.is_set():
            for sock in self.socks:
                with contextlib.suppress(OSError):
                    sock.send(header[self.sent:self.sent + 1])
            self.sent += 1
            self._stop.wait(1.0)  # a byte a second is the attack itself

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def health(url: str) -> bool:
    """One probe: ``/api/health`` answered 200 within 2 s, on a new connection."""
    start = time.monotonic()
    try:
        ok = requests.get(f"{url}/api/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False
    return ok and time.monotonic() - start < 2


# --- the Postbox service --------------------------------------------------------------------------------


class Service:
    """A Postbox in a temp folder, as a real process, with one key."""

    def __init__(self, root: Path, http: dict[str, Any] | None, dicom: dict[str, Any] | None,
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        root.mkdir(parents=True)
        (root / "benchalgos.py").write_text(NOOP)
        config = root / "config.yaml"
        config.write_text(yaml.safe_dump({
            "inbox": "inbox", "outbox": "outbox", "database": "index.json", "log_level": "INFO",
            "default_algorithm": "noop", "algorithms": [{"name": "noop", "function": "benchalgos:noop"}],
            "worker": {"settle_seconds": 0, "rescan_seconds": 1, "job_timeout": 60},
            "http": {"host": "127.0.0.1", "port": 0, **http} if http is not None else {"enabled": False},
            "dicom": {"enabled": True, "host": "127.0.0.1", "port": 0, "series_timeout": 60, **dicom}
            if dicom is not None else {"enabled": False},
        }))
        self.key = Index(root / "index.json").add_key("bench")
        self.log = root / "service.log"
        pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "facade.cli", "--config", str(config), "manage", "run"],
                                         cwd=root, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {}), "PYTHONPATH": pythonpath})
        ready = ReadyFile.path_for(root / "inbox", self.proc.pid)
        deadline = time.monotonic() + 60
        while not ready.is_file():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the service did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.02)
        self.doors: dict[str, Any] = json.loads(ready.read_text())["doors"]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def port(self, door: str) -> int:
        return int(self.doors[door]["port"])

    def stop(self) -> list[str]:
        """Stop it (SIGTERM); the ERROR lines and tracebacks of its log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        text = self.log.read_text(errors="replace")
        return [f"service log ({self.root.name}): {line[:300]}" for line in text.splitlines()
                if " ERROR " in line or "Traceback" in line]


# --- the HTTP attacks -------------------------------------------------------------------------------------


@dataclass
class ThreadsResult:
    answered: int
    probes: int
    held: int
    attackers: int
    seconds: float


def attack_threads(port: int, url: str, window: float) -> ThreadsResult:
    """64 silent and 32 slowloris connections; probes of ``/api/health`` from 127.0.0.1 meanwhile."""
    with Sockets() as socks:
        silent = [socks.open(port, ATTACKERS[0]) for _ in range(64)]
        slow = [socks.open(port, ATTACKERS[1]) for _ in range(32)]
        trickle = Trickle(slow)
        probes: list[bool] = []
        start = time.monotonic()
        try:
            while (trickle.sent < 4 or len(probes) < 20) and time.monotonic() - start < window:
                probes.append(health(url))
        finally:
            trickle.stop()
        seconds = time.monotonic() - start
        held = sum(is_open(s) for s in silent + slow)
    return ThreadsResult(sum(probes), len(probes), held, len(silent) + len(slow), seconds)


def attack_headers(port: int, count: int) -> tuple[list[str], list[int]]:
    """``count`` requests with a 100 MB header, each from its own address; what each got, bytes each sent."""
    answers = [""] * count
    sent = [0] * count

    def one(i: int) -> None:
        with connect(port, f"127.0.0.{2 + i}") as sock:
            try:
                sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: postbox\r\nX-Big: ")
                chunk = b"a" * MB
                for _ in range(100):
                    sock.sendall(chunk)
                    sent[i] += len(chunk)
            except OSError:
                pass
            answers[i] = http_answer(sock, 5)

    threads = [threading.Thread(target=one, args=(i,), name=f"header-{i}") for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers, sent


def open_files(pid: int | str) -> dict[tuple[int, int], tuple[str, int]]:
    """The regular files a process has open, by (device, inode): their path and size (deleted ones too)."""
    found: dict[tuple[int, int], tuple[str, int]] = {}
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
                st = os.stat(fd)
            except OSError:
                continue
            if target.startswith("/") and not target.startswith(("/dev/", "/proc/")):
                found[(st.st_dev, st.st_ino)] = (target, st.st_size)
    return found


class FileWatch:
    """What a process writes into ``folder`` (and opens outside ``root``) while the ``with`` block runs."""

    def __init__(self, pid: int | str, folder: Path, root: Path | None) -> None:
        self.pid, self.folder, self.root = pid, str(folder), root
        self.sizes: dict[tuple[int, int], int] = {}  # a file, by (device, inode): its largest size seen
        self.outside: set[str] = set()
        self.baseline = set(open_files(pid))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="file-watch", daemon=True)

    def _look(self) -> None:
        for ident, (path, size) in open_files(self.pid).items():
            if ident in self.baseline:
                continue
            if path.startswith(self.folder):
                self.sizes[ident] = max(self.sizes.get(ident, 0), size)
            elif self.root is not None and not path.startswith(str(self.root)):
                self.outside.add(path)
        for entry in Path(self.folder).rglob("*"):
            with contextlib.suppress(OSError):
                st = entry.stat()
                if entry.is_file():
                    ident = (st.st_dev, st.st_ino)
                    self.sizes[ident] = max(self.sizes.get(ident, 0), st.st_size)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self._look()

    def __enter__(self) -> FileWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._look()

    @property
    def written(self) -> int:
        return sum(self.sizes.values())


def attack_chunked(port: int, key: str | None) -> tuple[str, int]:
    """A chunked form body of 50 MB to ``POST /api/dataset``; the answer and the bytes sent."""
    sent = 0
    with connect(port, ATTACKERS[0], timeout=30) as sock:
        header = b"POST /api/dataset HTTP/1.1\r\nHost: postbox\r\nTransfer-Encoding: chunked\r\n"
        if key:
            header += b"API_KEY: %s\r\n" % key.encode()
        # Chunked twice: cheroot takes off one layer, and Bottle, seeing the header, the other.
        inner = b"%x\r\n%s\r\n" % (64 * 1024 - 9, b"a" * (64 * 1024 - 9))
        chunk = b"%x\r\n%s\r\n" % (len(inner), inner)
        try:
            sock.sendall(header + b"Content-Type: application/x-www-form-urlencoded\r\n\r\n")
            for _ in range(800):
                sock.sendall(chunk)
                sent += len(chunk)
            sock.sendall(b"5\r\n0\r\n\r\n\r\n0\r\n\r\n")  # the inner body's end in a last chunk, then the end
        except OSError:
            pass  # closed after the refusal: the rest is not read
        return http_answer(sock, 30), sent


def central_directory_bomb(entries: int) -> bytes:
    """A zip of ``entries`` empty files (stored): its central directory is the bomb (tests/test_abuse_http.py)."""
    local, central = [], []
    offset = 0
    for i in range(entries):
        name = b"%07d" % i
        local.append(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0) + name)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0, 0,
                                   0, 0, 0, offset) + name)
        offset += len(local[-1])
    cd = b"".join(central)
    zip64 = b""
    if entries > 0xFFFF:  # the count goes in the zip64 end record, found through its locator
        zip64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, entries, entries, len(cd), offset)
        zip64 += struct.pack("<IIQI", 0x07064B50, 0, offset + len(cd), 1)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(entries, 0xFFFF), min(entries, 0xFFFF), len(cd), offset, 0)
    return b"".join(local) + cd + zip64 + end


def attack_zip(url: str, key: str | None, body: bytes) -> str:
    """Upload the zip to ``POST /api/dataobject``; the answer (status and error)."""
    headers = {"API_KEY": key} if key else {}
    dataset = "1"
    if key:
        res = requests.post(f"{url}/api/dataset", headers=headers, timeout=30)
        res.raise_for_status()
        dataset = str(res.json()["id"])
    res = requests.post(f"{url}/api/dataobject", headers=headers, timeout=120,
                        data={"dataset": dataset, "type": "FILE"}, files={"file_data": ("ct.zip", body)})
    try:
        error = str(res.json().get("error", ""))
    except ValueError:
        error = res.text
    error = error.replace("|", "/").replace("\n", " ")
    return f"{res.status_code} ({error[:70]})" if error else str(res.status_code)


# --- the HTTP reference: cheroot and Bottle as they come ------------------------------------------------


class ReferenceHttp:
    """A plain ``cheroot.wsgi.Server`` with 16 threads serving a tiny Bottle app, in this process."""

    def __init__(self) -> None:
        self.spooled: list[tuple[bool, int]] = []  # per form request: body in a temp file?, its size
        app = bottle.Bottle()

        @app.get("/api/health")
        def _health() -> dict[str, str]:
            return {"status": "ok"}

        @app.post("/api/dataset")
        def _dataset() -> dict[str, int]:
            try:
                fields = bottle.request.forms  # Bottle reads the whole body first, spooling it past 100 kB
            finally:
                body = bottle.request.body
                self.spooled.append((not isinstance(body, io.BytesIO), body.seek(0, 2)))
            return {"id": 1, "fields": len(fields)}

        @app.post("/api/dataobject")
        def _dataobject() -> dict[str, Any]:
            upload = bottle.request.files.get("file_data")
            if upload is None:
                bottle.response.status = 400
                return {"error": "no file_data"}
            with zipfile.ZipFile(upload.file) as archive:  # the central directory, parsed whole
                entries = len(archive.infolist())
            if entries > REFERENCE_ZIP_ENTRIES:  # the limit, checked once it is all parsed
                bottle.response.status = 413
                return {"error": f"{entries} entries, over {REFERENCE_ZIP_ENTRIES}"}
            return {"entries": entries}

        self.server = wsgi.Server(("127.0.0.1", 0), app, numthreads=16, max=16, timeout=60)
        self.server.prepare()
        self.port = int(self.server.bind_addr[1])
        self.thread = threading.Thread(target=self.server.serve, name="reference-cheroot", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(timeout=10)


# --- the DICOM attacks -------------------------------------------------------------------------------------


def echoscu(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ECHOSCU, "-aet", "ECHOSCU", "-aec", "POSTBOX", "-to", "5", "-ta", "5", "127.0.0.1",
                           str(port)], capture_output=True, text=True, env=DCMTK_ENV, timeout=30)


@dataclass
class EchoResult:
    seconds: float | None  # until the first C-ECHO answered, None if none was within the window
    refused: int
    first_refusal: str
    held: int
    silent: int
    window: float


def attack_silent_echo(port: int, window: float) -> EchoResult:
    """40 silent sockets, then echoscu every 0.5 s until one C-ECHO is answered."""
    with Sockets() as socks:
        silent = [socks.open(port, ATTACKERS[0]) for _ in range(40)]
        start = time.monotonic()
        refused, first, seconds = 0, "", None
        while True:
            proc = echoscu(port)
            if proc.returncode == 0:
                seconds = time.monotonic() - start
                break
            refused += 1
            if not first:
                lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
                first = next((ln for ln in lines if "Reason:" in ln),
                             next((ln for ln in lines if "Reject" in ln), lines[-1] if lines else ""))
            if time.monotonic() - start > window:
                break
            time.sleep(0.5)
        held = sum(is_open(s) for s in silent)
    first = first.replace("|", "/").removeprefix("F:").strip()
    return EchoResult(seconds, refused, first[:90], held, len(silent), window)


@dataclass
class PduResult:
    sent: int
    answer: str
    aborted: bool | None = None  # within an association: whether it was aborted
    notes: list[str] = field(default_factory=list)


def _describe_dicom_reply(what: str, data: bytes) -> str:
    if what != "data":
        return what
    return "A-ABORT" if data[:1] == b"\x07" else f"PDU 0x{data[0]:02X}"


def attack_pdu_before(port: int, send: int) -> PduResult:
    """An A-ASSOCIATE-RQ declaring 4 GiB, then ``send`` bytes of zeros, from an attacking address."""
    sent = 0
    with connect(port, ATTACKERS[0]) as sock:
        try:
            sock.sendall(b"\x01\x00" + struct.pack(">L", 0xFFFFFFFF))
            block = bytes(MB)
            while sent < send:
                sock.sendall(block)
                sent += len(block)
        except OSError:
            pass
        return PduResult(sent, _describe_dicom_reply(*reply(sock, 2)))


def attack_pdu_within(port: int, send: int) -> PduResult:
    """An allowed AE's association, then a P-DATA-TF declaring 4 GiB and ``send`` bytes of zeros."""
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="POSTBOX", bind_address=(PROBE, 0))
    try:
        if not assoc.is_established:
            raise RuntimeError("the association of an allowed AE was not established")
        if assoc.dul.socket is None or assoc.dul.socket.socket is None:
            raise RuntimeError("the association has no socket")
        raw = assoc.dul.socket.socket
        sent = 0
        try:
            raw.sendall(b"\x04\x00" + struct.pack(">L", 0xFFFFFFFF))
            block = bytes(MB)
            while sent < send:
                raw.sendall(block)
                sent += len(block)
        except OSError:
            pass
        deadline = time.monotonic() + 3
        while assoc.is_alive() and not assoc.is_aborted and time.monotonic() < deadline:
            time.sleep(0.02)
        aborted = bool(assoc.is_aborted or not assoc.is_alive())
        return PduResult(sent, "aborted" if aborted else "still open", aborted)
    finally:
        if assoc.is_alive():
            assoc.abort()
        ae.shutdown()


def _encode(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def deflate_bomb(folder: Path, zeros: int = GiB) -> Path:
    """A CT instance whose private element (0009,1000) is ``zeros`` bytes of zeros, deflated (streamed)."""
    [path] = phantom.write_dicom(folder / f"ct-{zeros}", phantom.axial_grid(slices=1, size=16))
    ds = pydicom.dcmread(path)
    ds.add_new(0x00090010, "LO", "POSTBOX TEST")
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [z.compress(_encode(Dataset({e.tag: e for e in ds if e.tag < 0x00091000}))),
             z.compress(struct.pack("<HH2sHI", 0x0009, 0x1000, b"OB", 0, zeros))]
    block = bytes(16 * MB)
    parts += [z.compress(block) for _ in range(zeros // len(block))]
    parts += [z.compress(_encode(Dataset({e.tag: e for e in ds if e.tag > 0x00091000}))), z.flush()]
    meta = FileMetaDataset(ds.file_meta)
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    fp = DicomBytesIO()
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    target = folder / f"bomb-{zeros >> 20}MiB.dcm"
    target.write_bytes(fp.getvalue() + b"".join(parts))
    return target


def store(port: int, path: Path) -> int:
    """C-STORE the file as it is on disk (its deflated bytes sent as they are); the status answered."""
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, [DeflatedExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="POSTBOX", bind_address=(PROBE, 0))
    try:
        if not assoc.is_established:
            raise RuntimeError("the storing association was not established")
        status = assoc.send_c_store(path)
        return int(status.Status) if "Status" in status else -1
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


# --- the DICOM reference: pynetdicom as it comes ----------------------------------------------------------


class ReferenceDicom:
    """A plain pynetdicom AE in this process, reading a few attributes of each instance as the node did."""

    def __init__(self) -> None:
        self.ae = AE(ae_title="POSTBOX")
        self.ae.maximum_associations = 10
        self.ae.maximum_pdu_size = 0
        self.ae.add_supported_context(Verification)
        self.ae.add_supported_context(CTImageStorage)  # its default transfer syntaxes include Deflated

        def on_store(event: Any) -> int:
            ds = event.dataset  # decoded whole: a deflated instance inflated in memory
            _ = ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.Modality
            return 0x0000

        server = self.ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert server is not None  # block=False: the server is returned
        self.server = server
        self.port = int(self.server.server_address[1])

    def stop(self) -> None:
        self.ae.shutdown()


# --- the table ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    attack: str
    postbox: str
    target: str
    ok: bool | None
    reference: str

    def cells(self) -> list[str]:
        return [self.attack, self.postbox, self.target, {None: "info", True: "PASS", False: "MISS"}[self.ok],
                self.reference]


class Run:
    """The rows and problems of a run; ``attempt`` keeps one failing attack from ending the others."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.problems: list[str] = []

    def attempt(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # a bench: report it, go on with the next attack
            self.problems.append(f"{what}: {type(exc).__name__}: {exc}")
            return None


def _err(value: Any) -> str:
    return "error (see below)" if value is None else str(value)


def run_http(run: Run, base: Path, probe_window: float) -> None:
    systemp = base / "http-systemp"
    systemp.mkdir()
    svc = Service(base / "http-site", {"header_timeout": 30, "max_connections_per_address": 100},
                  None, env={"TMPDIR": str(systemp)})
    url = f"http://127.0.0.1:{svc.port('http')}"
    port = svc.port("http")
    zip_body = central_directory_bomb(200_000)
    try:
        pb_threads = run.attempt("postbox: silent + slowloris", lambda: attack_threads(port, url, probe_window))
        with Memory(svc.pid) as pb_head_mem:
            pb_head = run.attempt("postbox: huge headers", lambda: attack_headers(port, 4))
        with FileWatch(svc.pid, systemp, svc.root) as pb_watch:
            pb_chunk = run.attempt("postbox: chunked form", lambda: attack_chunked(port, svc.key))
        with Memory(svc.pid) as pb_zip_mem:
            pb_zip = run.attempt("postbox: zip bomb", lambda: attack_zip(url, svc.key, zip_body))
        if not health(url):
            run.problems.append("postbox: /api/health not answered after the attacks")
    finally:
        run.problems.extend(svc.stop())

    ref = ReferenceHttp()
    ref_url = f"http://127.0.0.1:{ref.port}"
    ref_systemp = base / "reference-systemp"
    ref_systemp.mkdir()
    try:
        ref_threads = run.attempt("reference: silent + slowloris",
                                  lambda: attack_threads(ref.port, ref_url, probe_window))
        with Memory() as ref_head_mem:
            ref_head = run.attempt("reference: huge header", lambda: attack_headers(ref.port, 1))
        saved, tempfile.tempdir = tempfile.tempdir, str(ref_systemp)  # Bottle's TemporaryFile goes there
        try:
            with FileWatch("self", ref_systemp, None) as ref_watch:
                ref_chunk = run.attempt("reference: chunked form", lambda: attack_chunked(ref.port, None))
        finally:
            tempfile.tempdir = saved
        with Memory() as ref_zip_mem:
            ref_zip = run.attempt("reference: zip bomb", lambda: attack_zip(ref_url, None, zip_body))
    finally:
        ref.stop()

    def threads_cell(r: ThreadsResult | None) -> str:
        if r is None:
            return _err(r)
        share = r.answered / r.probes if r.probes else 0.0
        return (f"{share:.0%} ({r.answered} of {r.probes} in {r.seconds:.1f} s); "
                f"{r.held} of {r.attackers} attackers held")

    ok = None if pb_threads is None else (pb_threads.probes > 0 and pb_threads.answered / pb_threads.probes >= 0.9)
    run.rows.append(Row("HTTP: 64 silent + 32 slowloris connections open; `/api/health` probes answered within 2 s",
                        threads_cell(pb_threads), ">= 90%", ok, threads_cell(ref_threads)))

    def headers_cell(r: tuple[list[str], list[int]] | None, mem: Memory) -> str:
        if r is None:
            return _err(r)
        answers, sent = r
        return f"RSS +{mb(mem.grown)}; client got {', '.join(answers)} (sent {', '.join(mb(s) for s in sent)})"

    ok = None if pb_head is None else (pb_head_mem.grown < 100 * MB
                                       and all(a in ("431", "closed", "reset") for a in pb_head[0]))
    run.rows.append(Row("HTTP: four 100 MB request headers (reference: ONE, scaled down for its memory)",
                        headers_cell(pb_head, pb_head_mem), "RSS < 100 MB; 431 or closed", ok,
                        headers_cell(ref_head, ref_head_mem)))

    def chunk_cell(r: tuple[str, int] | None, watch: FileWatch) -> str:
        if r is None:
            return _err(r)
        answer, sent = r
        written = mb(watch.written) if watch.written else "0 bytes"
        cell = f"{written} written to the system temp folder; answer {answer} (sent {mb(sent)})"
        if watch.outside:
            cell += f"; opened outside its folders: {', '.join(sorted(watch.outside))[:200]}"
        return cell

    ref_cell = chunk_cell(ref_chunk, ref_watch)
    if ref.spooled:
        in_file, size = ref.spooled[-1]
        ref_cell += f" (Bottle's own count: {mb(size)} {'in a temp file' if in_file else 'in memory'})"
    ok = None if pb_chunk is None else (pb_watch.written == 0 and not pb_watch.outside
                                        and pb_chunk[0] in ("413", "closed", "reset"))
    run.rows.append(Row("HTTP: chunked 50 MB form body to `POST /api/dataset`", chunk_cell(pb_chunk, pb_watch),
                        "0 bytes; 413", ok, ref_cell))

    def zip_cell(r: str | None, mem: Memory) -> str:
        return _err(r) if r is None else f"RSS +{mb(mem.grown)}; answer {r}"

    ok = None if pb_zip is None else (pb_zip_mem.grown < 20 * MB and pb_zip.startswith("413"))
    run.rows.append(Row(f"HTTP: zip whose central directory holds 200,000 entries ({mb(len(zip_body))}) "
                        "to `POST /api/dataobject`", zip_cell(pb_zip, pb_zip_mem), "RSS < 20 MB; 413", ok,
                        zip_cell(ref_zip, ref_zip_mem)))


def run_dicom(run: Run, base: Path, echo_window: float) -> None:
    bombs = base / "bombs"
    started = time.monotonic()
    bomb = deflate_bomb(bombs)
    built = time.monotonic() - started
    dicom = {"allowed_ae_titles": ["ECHOSCU", "STORESCU"], "associate_timeout": 15,
             "max_connections_per_address": 64, "max_instance_mb": 64}
    svc = Service(base / "dicom-site", None, dicom)
    port = svc.port("dicom")
    send = 200 * MB
    try:
        pb_echo = run.attempt("postbox: silent sockets + C-ECHO", lambda: attack_silent_echo(port, echo_window))
        with Memory(svc.pid, settle=1) as pb_before_mem:
            pb_before = run.attempt("postbox: 4 GiB A-ASSOCIATE-RQ", lambda: attack_pdu_before(port, send))
        with Memory(svc.pid, settle=1) as pb_within_mem:
            pb_within = run.attempt("postbox: 4 GiB P-DATA-TF", lambda: attack_pdu_within(port, send))
        with Memory(svc.pid) as pb_bomb_mem:
            pb_bomb = run.attempt("postbox: deflate bomb", lambda: store(port, bomb))
        if echoscu(port).returncode != 0:
            run.problems.append("postbox: C-ECHO not answered after the attacks")
    finally:
        run.problems.extend(svc.stop())

    # The default limits: max_instance_mb (2048) would take 1 GiB, max_deflate_ratio (200) refuses the bomb.
    svc = Service(base / "dicom-site-default", None, {})
    try:
        with Memory(svc.pid) as pb_default_mem:
            pb_default = run.attempt("postbox (default limit): deflate bomb", lambda: store(svc.port("dicom"), bomb))
        stored = list((svc.root / "inbox").glob(".staging/*/input/*/*.dcm"))
    finally:
        run.problems.extend(svc.stop())

    ref = ReferenceDicom()
    try:
        ref_echo = run.attempt("reference: silent sockets + C-ECHO", lambda: attack_silent_echo(ref.port, echo_window))
        # Its silent associations go only at its ARTIM timeout (30 s): the attacks below need it free again.
        deadline = time.monotonic() + 40
        while echoscu(ref.port).returncode != 0:
            if time.monotonic() > deadline:
                run.problems.append("reference: C-ECHO still refused 40 s after the silent sockets closed")
                break
            time.sleep(0.5)
        with Memory(settle=1) as ref_before_mem:
            ref_before = run.attempt("reference: 4 GiB A-ASSOCIATE-RQ", lambda: attack_pdu_before(ref.port, send))
        with Memory(settle=1) as ref_within_mem:
            ref_within = run.attempt("reference: 4 GiB P-DATA-TF", lambda: attack_pdu_within(ref.port, send))
        available = available_memory()
        ref_bomb_path, scaled = bomb, ""
        if available < SAFE_AVAILABLE:  # it inflates the whole instance, ~2-3 GB for 1 GiB: smaller then
            ref_bomb_path = deflate_bomb(bombs, 256 * MB)
            scaled = f" (SCALED DOWN to a 256 MiB bomb: only {available / GiB:.1f} GiB available)"
        with Memory() as ref_bomb_mem:
            ref_bomb = run.attempt("reference: deflate bomb", lambda: store(ref.port, ref_bomb_path))
    finally:
        ref.stop()
        _trim()

    def echo_cell(r: EchoResult | None) -> str:
        if r is None:
            return _err(r)
        if r.seconds is None:
            cell = f"not answered within {r.window:g} s ({r.refused} refused: {r.first_refusal})"
        elif r.refused:
            cell = f"answered after {r.seconds:.1f} s ({r.refused} refused before: {r.first_refusal})"
        else:
            cell = f"answered in {r.seconds:.2f} s"
        return f"{cell}; {r.held} of {r.silent} silent sockets held"

    ok = None if pb_echo is None else (pb_echo.seconds is not None and pb_echo.seconds < 5)
    run.rows.append(Row("DICOM: 40 silent sockets open; an allowed AE's C-ECHO (dcmtk `echoscu`)",
                        echo_cell(pb_echo), "< 5 s", ok, echo_cell(ref_echo)))

    def pdu_cell(r: PduResult | None, mem: Memory) -> str:
        if r is None:
            return _err(r)
        taken = mb(r.sent) if r.sent else "under 1 MB"  # counted in whole 1 MB blocks sent
        return f"{taken} of {mb(send)} taken, then {r.answer}; RSS +{mb(mem.grown)}"

    ok = None if pb_before is None else (pb_before.sent < 64 * MB and pb_before.answer in ("A-ABORT", "closed", "reset")
                                         and pb_before_mem.grown < 50 * MB)
    run.rows.append(Row("DICOM: A-ASSOCIATE-RQ declaring 4 GiB, then 200 MB (no AE title checked yet)",
                        pdu_cell(pb_before, pb_before_mem), "aborted unread (< 64 MB taken); RSS < 50 MB", ok,
                        pdu_cell(ref_before, ref_before_mem)))
    ok = None if pb_within is None else (pb_within.sent < 64 * MB and bool(pb_within.aborted)
                                         and pb_within_mem.grown < 50 * MB)
    run.rows.append(Row("DICOM: P-DATA-TF declaring 4 GiB in an allowed AE's association, then 200 MB",
                        pdu_cell(pb_within, pb_within_mem), "aborted unread (< 64 MB taken); RSS < 50 MB", ok,
                        pdu_cell(ref_within, ref_within_mem)))

    def bomb_cell(status: int | None, mem: Memory) -> str:
        return _err(status) if status is None else f"status 0x{status:04X}; RSS +{mb(mem.grown)}"

    size = bomb.stat().st_size
    ok = None if pb_bomb is None else (pb_bomb == OUT_OF_RESOURCES and pb_bomb_mem.grown < 200 * MB)
    run.rows.append(Row(f"DICOM: deflate bomb, C-STORE of {mb(size)} deflated / 1 GiB inflated "
                        f"(`dicom.max_instance_mb` 64; built once in {built:.1f} s)",
                        bomb_cell(pb_bomb, pb_bomb_mem), "0xA700; RSS < 200 MB", ok,
                        bomb_cell(ref_bomb, ref_bomb_mem) + scaled))
    default_cell = bomb_cell(pb_default, pb_default_mem)
    if pb_default is not None:
        default_cell += f"; {len(stored)} instance(s) stored"
    ok = None if pb_default is None else (pb_default == OUT_OF_RESOURCES and pb_default_mem.grown < 200 * MB
                                          and not stored)
    run.rows.append(Row("DICOM: the same bomb with the default limits (`max_instance_mb` 2048, "
                        "`max_deflate_ratio` 200)", default_cell, "0xA700, none stored; RSS < 200 MB", ok,
                        "as above"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--only", choices=["http", "dicom"], help="run one half only")
    p.add_argument("--probe-window", type=float, default=10.0,
                   help="longest time the health probes run under the thread attack (default 10 s)")
    p.add_argument("--echo-window", type=float, default=35.0,
                   help="longest time C-ECHO is retried under the silent sockets (default 35 s)")
    p.add_argument("--dir", type=Path, default=None, help="where to work (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (its path is printed)")
    args = p.parse_args(argv)
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL + 1)  # the references' refusals are expected
    _config.STORE_SEND_CHUNKED_DATASET = True  # send a file's encoded data set as it is, never decoded here
    base = Path(tempfile.mkdtemp(prefix="postbox-bench-abuse-", dir=args.dir))
    run = Run()
    started = time.monotonic()
    try:
        if args.only in (None, "http"):
            run.attempt("http", lambda: run_http(run, base, args.probe_window))
        if args.only in (None, "dicom"):
            run.attempt("dicom", lambda: run_dicom(run, base, args.echo_window))
    finally:
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    print("| attack | with Postbox | target | result | unguarded reference (same attack, same run) |")
    print("|---|---|---|---|---|")
    for row in run.rows:
        print("| " + " | ".join(row.cells()) + " |")
    print(f"\n({time.monotonic() - started:.0f} s in all)")
    for problem in run.problems:
        print(f"\nproblem: {problem}")
    return 1 if run.problems else 0


if __name__ == "__main__":
    sys.exit(main())
