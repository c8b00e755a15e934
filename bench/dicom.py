"""Benchmark of the DICOM node (not a test): C-STORE throughput against other SCPs, and job start after release.

Run it as ``python bench/dicom.py`` from the repository (``--help`` for the sizes). It prints one Markdown
table with each figure, its target and PASS/MISS, and the references measured in the same run:

- A CT phantom (``phantom.axial_grid(slices=300, size=512)``, Explicit VR Little Endian, ~0.5 MB a slice)
  is written once into a temp folder; dcmtk's ``storescu +sd`` sends all of it over one association to
  each receiver in turn:

  - the Postbox node: a real service, ``python -m facade.cli --config CFG manage run``, with a no-op
    algorithm next to its config.yaml, ``complete_on_release: true``, ``incomplete: run``,
    ``worker.settle_seconds: 0``;
  - dcmtk's ``storescp -od OUT`` (a C++ SCP writing each instance to a file);
  - a plain pynetdicom SCP that decodes each dataset and saves it (``event.dataset``, ``file_meta``,
    ``save_as``), which is what most Python DICOM nodes do;
  - a plain pynetdicom SCP that writes ``event.encoded_dataset()`` as received (the floor for pynetdicom).

  dcmtk runs with ``TCP_NODELAY=1`` in its environment: Debian's dcmtk 3.6.7 leaves Nagle's algorithm on
  otherwise and crawls at ~20 instances/s. dcmtk tools are called by absolute path (/usr/bin) since a
  Python package may put a script of the same name earlier on PATH.
- Each figure is the wall-clock time of the ``storescu`` process (start, association, 300 C-STOREs,
  release, exit), so it includes ~10-20 ms of process start and association set-up for every receiver.
  The receivers are all started first and idle while another one is measured; the rounds are interleaved
  (every receiver once per round) and ``os.sync()`` runs, untimed, before each send so that the writeback
  of an earlier run does not slow a later one. The figure is the MEDIAN of the rounds; the table also
  lists every round. MB/s counts the bytes of the phantom's files (10^6 bytes a MB).
- CPU ms/inst is the receiving process's user + system CPU (``/proc/PID/stat``) during the send, divided by
  the instances (median of the rounds): on a shared machine it moves less than the wall-clock figures,
  which other processes' load slows by tens of per cent from one round to the next.
- Association set-up: ``echoscu`` (set-up, C-ECHO, release, process start included) against each receiver.
- DICOM over TLS, in the same interleaved rounds (``--no-tls`` leaves it out, ``--tls-only`` runs only the
  node and storescp, plain and over TLS): a second service with ``dicom.tls`` (a client certificate
  required), against dcmtk's ``storescp +tls -rc``, both sent to by ``storescu +tls`` with a client
  certificate of a private CA (``make_certificates``, ECDSA P-256); the throughput, the handshake's share
  of the association set-up, and job start, each beside its plain figure.
- Job start after release: ``storescu``'s exit (just after the association release) to the job's
  ``timings.algorithm_started`` (epoch, taken in the algorithm's child process, read from the outbox
  job.yaml), split at ``timings.committed`` (taken in ``jobs.commit`` before the inputs are fsynced), the
  service log's ``job ID: committed`` line (written after the fsync and the rename into inbox/, to the ms)
  and ``timings.claimed`` (set in ``jobs.start_attempt``, after the worker's own gate). A small series is
  sent first so that the algorithm's child is warm; its (cold) figure is given as a note.
- ``--profile`` also runs a ``DicomNode`` in this process for one send with cProfile in its receiving
  threads (pynetdicom's association and DUL threads) and around its series completion, timed by
  ``time.thread_time`` (waiting in select(), on a lock or for the disk does not count), and prints the top.

A large series (issue 8, defect 10), ``--instances`` slices of ``--size`` (default 2,000 of 512x512, ~1 GB),
then measures the completeness gate and the service around it (``--instances 0`` leaves it out,
``--large-only`` leaves out everything above):

- The phantom is written ``CHUNK`` slices at a time (``phantom.write_dicom`` samples its whole volume in
  memory: ~10 GB for 2,000 slices at once) on one grid and one set of UIDs; InstanceNumber and
  ImagesInAcquisition are then set to the whole series' own, so the gate sees one whole volume.
- The gate: ``gate.problems(folder)`` against the old way, every header read with
  ``pydicom.dcmread(stop_before_pixels=True)`` and kept, and against ``read_series`` (the series reader,
  on which the old gate was built). Each runs in a fresh process (files in the page cache, imports and
  pydicom's caches warmed on a 4-slice series first), interleaved, ``--repeat`` rounds, medians: the
  time, the rise of the process's RSS (``VmHWM`` after ``clear_refs``, against ``VmRSS`` before) and, in
  a second process, tracemalloc's peak.
- The service's memory: a fresh service (as above), warmed with a small job, whose ``VmRSS`` is then its
  idle RSS; before each send its ``VmHWM`` is reset (``/proc/PID/clear_refs``), and once the job is in
  the outbox ``VmHWM`` minus idle is that round's peak above idle (the figure is the highest round) and
  ``VmRSS`` minus idle what it kept.
- Job start after release for the large series, split as for the 300 slices.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime
import io
import json
import os
import pstats
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402
import yaml  # noqa: E402

from pipeline import phantom  # noqa: E402
from pipeline.tls import make_certificates  # noqa: E402

STORESCU, STORESCP, ECHOSCU = "/usr/bin/storescu", "/usr/bin/storescp", "/usr/bin/echoscu"
DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")  # Debian's dcmtk 3.6.7 leaves Nagle on otherwise
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Targets (the filer's): the node against storescp and the decode-and-save pynetdicom SCP; job start.
TARGET_VS_STORESCP = 0.25
TARGET_VS_DECODE = 1.3
TARGET_JOB_START = 0.5
# Issue 8, defect 10, for a large series (2,000 instances): the service's peak above idle, job start.
TARGET_LARGE_RSS_MB = 50
TARGET_LARGE_JOB_START = 1.5
# The gate's own bound, as tests/test_gate.py asserts it: tracemalloc's peak per image.
TARGET_GATE_BYTES_PER_IMAGE = 2048
CHUNK = 100  # phantom slices sampled at once for the large series (~0.5 GB of arrays at 512x512)

NOOP = "def noop(data_objects, working_dir, settings):\n    return []\n"

# A plain pynetdicom C-STORE SCP: argv mode ("decode" or "raw"), output folder, port.
PLAIN_SCP = r'''
import sys
from pathlib import Path

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

mode, out, port = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])


def on_store(event):
    path = out / f"{event.request.AffectedSOPInstanceUID}.dcm"
    if mode == "decode":
        ds = event.dataset
        ds.file_meta = event.file_meta
        try:
            ds.save_as(path, enforce_file_format=True)  # pydicom >= 3
        except TypeError:
            ds.save_as(path, write_like_original=False)  # pydicom 2
    else:
        with open(path, "wb") as fh:
            fh.write(event.encoded_dataset())
    return 0x0000


ae = AE(ae_title="PLAINSCP")
ae.supported_contexts = AllStoragePresentationContexts
ae.add_supported_context(Verification)
server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
sys.stdin.read()  # until the bench closes stdin
server.shutdown()
'''


# The gate in a process of its own: argv mode ("gate", "headers" or "series"), folder, warm-up folder,
# "1" for tracemalloc; prints one JSON line. The process's RSS rise is VmHWM after clear_refs 5 (which
# resets VmHWM to the current RSS) minus VmRSS before.
GATE_CHILD = r'''
import gc
import json
import sys
import time
import tracemalloc
from pathlib import Path

import pydicom

from pipeline import gate

mode, folder, warmup, traced = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1"
if mode == "series":
    from pipeline.writers.series import read_series  # SimpleITK comes with it: loaded before the baseline


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024


def run(where):
    if mode == "gate":
        return gate.problems(where)
    if mode == "headers":  # the old way: every header, kept
        files = sorted(p for p in where.rglob("*") if p.is_file() and not p.name.startswith("."))
        return [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    return read_series(where)


run(warmup)  # lazy imports and pydicom's caches are not what is measured
gc.collect()
if traced:
    tracemalloc.start()
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
before = status("VmRSS")
t = time.perf_counter()
result = run(folder)
seconds = time.perf_counter() - t
rise = status("VmHWM") - before
peak = tracemalloc.get_traced_memory()[1] if traced else None
print(json.dumps({"seconds": seconds, "rss": rise, "traced": peak, "kept": len(result) if mode != "series" else 0}))
'''


# --- small helpers --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def echo(port: int, tls: list[str] | None = None) -> bool:
    proc = subprocess.run([ECHOSCU, *(tls or []), "-to", "2", "127.0.0.1", str(port)], env=DCMTK_ENV,
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc.returncode == 0


def tls_client(certs: Path) -> list[str]:
    """dcmtk's options for TLS with our client certificate, the receiver checked against our CA."""
    return ["+tls", str(certs / "client-key.pem"), str(certs / "client.pem"), "+cf", str(certs / "ca.pem")]


def storescu(port: int, folder: Path, called: str = "ANY-SCP", tls: list[str] | None = None) -> tuple[float, float]:
    """Send ``folder`` over one association; (wall-clock seconds, epoch of the process's exit)."""
    t = time.perf_counter()
    proc = subprocess.run([STORESCU, *(tls or []), "-aec", called, "+sd", "127.0.0.1", str(port), str(folder)],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=300)
    seconds, exited = time.perf_counter() - t, time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"storescu to port {port} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return seconds, exited


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its threads so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log_time(log: Path, needle: str) -> float | None:
    """Epoch of the first service-log line containing ``needle`` (the log's local time, to the ms)."""
    for line in log.read_text(errors="replace").splitlines():
        if needle in line:
            stamp = line[:23]  # "2026-11-25 19:26:35,398"
            try:
                return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                return None
    return None


def proc_status(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` memory figure (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(f"{key} not in /proc/{pid}/status")


def reset_peak(pid: int) -> None:
    """Set a process's VmHWM back to its current RSS (Linux 4.0+, same user)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def count_files(folder: Path) -> int:
    return sum(1 for _root, _dirs, files in os.walk(folder) for f in files if not f.startswith("."))


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> int | None:
    if proc.poll() is None:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Row:
    """One line of the results table."""

    def __init__(self, figure: str, value: str, target: str = "-", ok: bool | None = None,
                 reference: str = "-", ratio: str = "-") -> None:
        result = {None: "info", True: "PASS", False: "MISS"}[ok]
        self.cells = [figure, value, target, result, reference, ratio]


# --- the receivers --------------------------------------------------------------------------------


class Receiver:
    """An SCP on a port of its own; ``send`` times one storescu of the phantom to it."""

    label = ""
    called = "ANY-SCP"
    tls: list[str] | None = None  # dcmtk's client options when the receiver serves TLS

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.proc: subprocess.Popen[Any] | None = None
        self.out = base / "out"
        self.times: list[float] = []
        self.cpus: list[float] = []  # the receiving process's CPU seconds during each send
        self.echoes: list[float] = []

    def start(self) -> None:
        raise NotImplementedError

    def ready(self) -> None:
        assert self.proc is not None
        ok = wait_until(lambda: self.proc.poll() is not None or echo(self.port, self.tls), 30, 0.1)  # type: ignore[union-attr]
        if not ok or self.proc.poll() is not None:
            raise RuntimeError(f"{self.label} did not start on port {self.port}")

    def echo_times(self, n: int) -> None:
        """Association set-up, C-ECHO and release with dcmtk's echoscu, ``n`` times (process start included)."""
        for _ in range(n):
            t = time.perf_counter()
            if not echo(self.port, self.tls):
                raise RuntimeError(f"{self.label}: echoscu failed")
            self.echoes.append(time.perf_counter() - t)

    def send(self, folder: Path, expected: int) -> float:
        assert self.proc is not None
        cpu = cpu_seconds(self.proc.pid)
        seconds, _ = storescu(self.port, folder, self.called, self.tls)
        self.cpus.append(cpu_seconds(self.proc.pid) - cpu)
        got = count_files(self.out)
        if got != expected:
            raise RuntimeError(f"{self.label}: {got} of {expected} instances written")
        shutil.rmtree(self.out)  # the SCP is idle between sends: empty its folder for the next one
        self.out.mkdir()
        self.times.append(seconds)
        return seconds

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


class Storescp(Receiver):
    label = "dcmtk storescp `-od` (C++)"

    def start(self) -> None:
        self.out.mkdir(parents=True)
        self.proc = subprocess.Popen([STORESCP, *self.server_tls(), "-od", str(self.out), str(self.port)],
                                     env=DCMTK_ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.ready()

    def server_tls(self) -> list[str]:
        return []


class StorescpTls(Storescp):
    """storescp serving TLS as the node does: our server certificate, a client certificate required (``-rc``)."""

    label = "dcmtk storescp `+tls -rc -od` (C++)"

    def __init__(self, base: Path, certs: Path) -> None:
        super().__init__(base)
        self.certs = certs
        self.tls = tls_client(certs)

    def server_tls(self) -> list[str]:
        return ["+tls", str(self.certs / "server-key.pem"), str(self.certs / "server.pem"),
                "+cf", str(self.certs / "ca.pem"), "-rc"]


class PlainScp(Receiver):
    def __init__(self, base: Path, mode: str) -> None:
        super().__init__(base)
        self.mode = mode
        self.label = ("pynetdicom SCP, decode and save (`event.dataset` + `save_as`)" if mode == "decode"
                      else "pynetdicom SCP, received bytes as they came (`encoded_dataset()`)")

    def start(self) -> None:
        self.out.mkdir(parents=True)
        self.proc = subprocess.Popen([sys.executable, "-c", PLAIN_SCP, self.mode, str(self.out), str(self.port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        self.ready()


class Postbox(Receiver):
    """A Postbox service in its own folder with the DICOM door on and a no-op algorithm."""

    label = "Postbox node (`pipeline/node.py`)"
    called = "POSTBOX"

    def __init__(self, base: Path, certs: Path | None = None) -> None:
        super().__init__(base)
        self.certs = certs  # serve TLS (dicom.tls, client certificates required) with these
        if certs is not None:
            self.label = "Postbox node over TLS (`dicom.tls`, client certificate required)"
            self.tls = tls_client(certs)
        self.latencies: list[dict[str, float]] = []
        self.warmup: dict[str, float] = {}
        self.jobs: list[dict[str, Any]] = []
        self.outbox = base / "outbox"
        self.log = base / "service.log"

    def start(self) -> None:
        self.base.mkdir(parents=True)
        (self.base / "benchalgos.py").write_text(NOOP)
        config = self.base / "config.yaml"
        dicom: dict[str, Any] = {"enabled": True, "host": "127.0.0.1", "port": self.port, "series_timeout": 30,
                                 "complete_on_release": True, "incomplete": "run"}
        if self.certs is not None:
            dicom["tls"] = {"cert": str(self.certs / "server.pem"), "key": str(self.certs / "server-key.pem"),
                            "ca": str(self.certs / "ca.pem"), "require_client_cert": True}
        config.write_text(yaml.safe_dump({
            "inbox": "inbox", "outbox": "outbox", "database": "index.json", "log_level": "INFO",
            "default_algorithm": "noop",
            "algorithms": [{"name": "noop", "function": "benchalgos:noop"}],
            "worker": {"settle_seconds": 0, "rescan_seconds": 1, "job_timeout": 120},
            "http": {"enabled": False},
            "dicom": dicom,
        }))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "facade.cli", "--config", str(config), "manage", "run"],
                                         cwd=self.base, env=env, stdin=subprocess.DEVNULL, stdout=fh,
                                         stderr=subprocess.STDOUT)
        ok = wait_until(lambda: b"worker: watching" in self.log.read_bytes() or self.proc.poll() is not None, 60)  # type: ignore[union-attr]
        if not ok or self.proc.poll() is not None:
            raise RuntimeError(f"the service did not start:\n{self.log.read_text()}")
        self.ready()

    def send(self, folder: Path, expected: int, record: bool = True) -> float:
        assert self.proc is not None
        before = set(os.listdir(self.outbox)) if self.outbox.is_dir() else set()
        cpu = cpu_seconds(self.proc.pid)
        seconds, exited = storescu(self.port, folder, self.called, self.tls)
        cpu = cpu_seconds(self.proc.pid) - cpu  # the receive only: the gate and the job come after
        new = wait_until(lambda: set(os.listdir(self.outbox)) - before, 300)
        if not new:
            raise RuntimeError(f"no job reached the outbox within 300 s:\n{self.log.read_text()[-3000:]}")
        [job_id] = new
        job = yaml.load((self.outbox / job_id / "job.yaml").read_text(), Loader=_Loader)
        if job["status"] != "done":
            raise RuntimeError(f"job {job_id} is {job['status']}: {job.get('error')}")
        got = job["inputs"][0]["meta_data"]["instances"]
        if got != expected or count_files(self.outbox / job_id / "input") != expected:
            raise RuntimeError(f"job {job_id} has {got} of {expected} instances")
        t = job["timings"]
        renamed = log_time(self.log, f"job {job_id}: committed")  # logged after the fsync and the rename
        lat = {"start": t["algorithm_started"] - exited, "gate": t["committed"] - exited,
               "fsync": (renamed - t["committed"]) if renamed else float("nan"),
               "pickup": (t["claimed"] - renamed) if renamed else float("nan"),
               "dispatch": t["algorithm_started"] - t["claimed"]}
        if record:
            self.times.append(seconds)
            self.cpus.append(cpu)
            self.latencies.append(lat)
            self.jobs.append(job)
        else:
            self.warmup = lat
        return seconds

    def problems(self) -> list[str]:
        text = self.log.read_text(errors="replace")
        bad = [ln for ln in text.splitlines() if " ERROR " in ln or "Traceback" in ln or " WARNING " in ln]
        return [f"service log: {bad[0].strip()} (+{len(bad) - 1} more)"] if bad else []


# --- profile: a DicomNode in this process ----------------------------------------------------------


def profile_node(base: Path, folder: Path, top: int = 25) -> str:
    """One send to an in-process DicomNode; cProfile on CPU time in its receiving and completing threads.

    A profiler is started and stopped inside each pynetdicom association thread and DUL thread (their
    ``run``) and around the node's series completion (gate and commit), timed by ``time.thread_time`` so
    that waiting in select(), on a lock or for the disk does not count.
    """
    from pynetdicom.association import Association
    from pynetdicom.dul import DULServiceProvider

    from pipeline.config import Config
    from pipeline.node import DicomNode

    root = base / "profile"
    root.mkdir()
    (root / "benchalgos.py").write_text(NOOP)
    cfg = Config.from_dict({
        "inbox": "inbox", "outbox": "outbox", "database": "index.json", "default_algorithm": "noop",
        "algorithms": [{"name": "noop", "function": "benchalgos:noop"}],
        "dicom": {"enabled": True, "host": "127.0.0.1", "port": free_port(), "series_timeout": 30,
                  "complete_on_release": True, "incomplete": "run"},
    }, base_dir=root)
    profiles: dict[str, list[cProfile.Profile]] = {}
    lock = threading.Lock()

    def profiled(fn: Callable[..., Any], kind: str) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            prof = cProfile.Profile(time.thread_time)
            prof.enable()
            try:
                return fn(*args, **kwargs)
            finally:
                prof.disable()
                with lock:
                    profiles.setdefault(kind, []).append(prof)
        return run

    patched = [(Association, "run_reactor"), (DULServiceProvider, "run_reactor"), (DicomNode, "_complete")]
    saved = [(cls, name, cls.__dict__[name]) for cls, name in patched]
    kinds = {Association: "association thread", DULServiceProvider: "DUL thread", DicomNode: "series completion"}
    for cls, name, fn in saved:
        setattr(cls, name, profiled(fn, kinds[cls]))
    node = DicomNode(cfg)
    node.start()
    try:
        wall, _ = storescu(node.port, folder, "POSTBOX")
        wait_until(lambda: len(profiles.get("series completion", [])) >= 1 and len(profiles) >= 3, 30)
    finally:
        node.stop()
        for cls, name, fn in saved:
            setattr(cls, name, fn)
    out = [f"in-process node, cProfile on thread CPU time: storescu took {wall:.2f} s (profiled)"]
    everything = None
    for kind, profs in sorted(profiles.items()):
        stats = pstats.Stats(*profs, stream=io.StringIO())
        out.append(f"{kind}: {stats.total_tt:.2f} s CPU")  # type: ignore[attr-defined]
        everything = stats if everything is None else everything.add(stats)
    if everything is None:
        return "profile: no thread was profiled"
    buf = io.StringIO()
    everything.stream = buf  # type: ignore[attr-defined]
    everything.sort_stats("cumulative").print_stats(top)
    everything.sort_stats("tottime").print_stats(top)
    out.append(buf.getvalue())
    return "\n".join(out)


# --- the large series: the gate and the service around it (issue 8, defect 10) ----------------------

GATE_MODES = {
    "gate": "`gate.problems(folder)`",
    "headers": "every header by `dcmread(stop_before_pixels=True)`, kept, no value decoded (the old way)",
    "series": "`read_series(folder)` (the series reader the old gate was built on)",
}


def write_series(folder: Path, instances: int, size: int) -> list[Path]:
    """A phantom CT series of ``instances`` axial slices of 0.5 mm, written ``CHUNK`` slices at a time.

    Each chunk is a part of one grid, written with the series' UIDs; InstanceNumber and ImagesInAcquisition
    are then set to the whole series' own (``write_dicom`` numbers each chunk from 1).
    """
    grid = phantom.axial_grid(slices=instances, size=size, slice_thickness=0.5)
    uids = {"study_uid": pydicom.uid.generate_uid(), "series_uid": pydicom.uid.generate_uid(),
            "frame_of_reference_uid": pydicom.uid.generate_uid()}
    scratch = folder.with_name(folder.name + ".chunk")
    folder.mkdir(parents=True)
    files: list[Path] = []
    for start in range(0, instances, CHUNK):
        part = dataclasses.replace(grid, slice_offsets=grid.slice_offsets[start:start + CHUNK])
        for k, path in enumerate(phantom.write_dicom(scratch, part, seed=start, **uids)):
            ds = pydicom.dcmread(path)
            ds.InstanceNumber = start + k + 1
            ds.ImagesInAcquisition = instances
            files.append(folder / f"CT_{start + k + 1:05d}.dcm")
            ds.save_as(files[-1], enforce_file_format=True)
            path.unlink()
    scratch.rmdir()
    return files


def measure_gate(folder: Path, warmup: Path, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Each way of gating ``folder`` in fresh processes, interleaved: seconds, RSS rise, tracemalloc peak."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    found: dict[str, dict[str, list[float]]] = {m: {"seconds": [], "rss": [], "traced": []} for m in GATE_MODES}
    for _ in range(rounds):
        for mode in GATE_MODES:
            for traced in (False, True):  # tracemalloc slows the run down: its peak comes from a run of its own
                proc = subprocess.run([sys.executable, "-c", GATE_CHILD, mode, str(folder), str(warmup),
                                       "1" if traced else "0"], env=env, capture_output=True, text=True,
                                      timeout=900)
                if proc.returncode != 0:
                    raise RuntimeError(f"gate child {mode} exited {proc.returncode}: {proc.stderr[-2000:]}")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                if mode == "gate" and result["kept"]:
                    raise RuntimeError(f"the gate found {result['kept']} problem(s) in the phantom series")
                if traced:
                    found[mode]["traced"].append(result["traced"])
                else:
                    found[mode]["seconds"].append(result["seconds"])
                    found[mode]["rss"].append(result["rss"])
    return found


def measure_service(node: Postbox, folder: Path, n: int, rounds: int) -> list[dict[str, float]]:
    """Send ``folder`` to a warm service ``rounds`` times: each round's peak and RSS kept above idle.

    Idle is the RSS once warm, before the first large send, for every round: what a round keeps (the old
    gate's headers were never given back to the system) raises the next round's RSS and would hide its peak
    from a baseline taken just before it.
    """
    assert node.proc is not None
    pid = node.proc.pid
    idle = proc_status(pid, "VmRSS")
    found: list[dict[str, float]] = []
    for _ in range(rounds):
        os.sync()
        reset_peak(pid)
        node.send(folder, n)
        found.append({"idle": idle, "peak": proc_status(pid, "VmHWM") - idle,
                      "kept": proc_status(pid, "VmRSS") - idle})
    return found


def latency_rows(node: Postbox, target: float, what: str) -> list[Row]:
    """Job start after the release of ``node``'s recorded sends, and its parts."""
    parts = (
        ("start", f"job start after release{what}: storescu exit -> `timings.algorithm_started`", target),
        ("gate", "  of which storescu exit -> `timings.committed` (node: series gate, manifest)", None),
        ("fsync", "  of which `committed` -> renamed into inbox/ (fsync of the inputs; service log, ms)", None),
        ("pickup", "  of which renamed -> `timings.claimed` (worker wakes, claims, gates again)", None),
        ("dispatch", "  of which `claimed` -> `algorithm_started` (warm child)", None),
    )
    rows = []
    for key, label, goal in parts:
        vals = [lat[key] for lat in node.latencies]
        m = statistics.median(vals)
        rows.append(Row(f"{label}, median of {len(vals)}", f"{m:.3f} s", f"< {goal} s" if goal else "-",
                        (m < goal) if goal else None, "runs " + " / ".join(f"{v:.3f}" for v in vals) + " s", "-"))
    return rows


def large_rows(gates: dict[str, dict[str, list[float]]], n: int, node: Postbox,
               memory: list[dict[str, float]]) -> list[Row]:
    med = {mode: {key: statistics.median(vals) for key, vals in figures.items()} for mode, figures in gates.items()}
    g, h, s = med["gate"], med["headers"], med["series"]
    rounds = len(gates["gate"]["seconds"])
    mib = 1024 * 1024

    def runs(mode: str, key: str, scale: float, fmt: str) -> str:
        return " / ".join(format(v / scale, fmt) for v in gates[mode][key])

    rows = [
        Row(f"gate time, {GATE_MODES['gate']} on {n} files, median of {rounds} (fresh process each; "
            f"runs {runs('gate', 'seconds', 1, '.2f')} s)",
            f"{g['seconds']:.2f} s ({g['seconds'] / n * 1e6:.0f} µs/file)", "-", None,
            f"old way (`dcmread` every header, kept) {h['seconds']:.2f} s; read_series {s['seconds']:.2f} s",
            f"{g['seconds'] / h['seconds']:.2f}x old way, {g['seconds'] / s['seconds']:.2f}x read_series"),
        Row(f"gate peak memory, tracemalloc (runs {runs('gate', 'traced', mib, '.2f')} MiB)",
            f"{g['traced'] / mib:.2f} MiB ({g['traced'] / n:.0f} B/image)",
            f"< {TARGET_GATE_BYTES_PER_IMAGE} B/image", g["traced"] / n < TARGET_GATE_BYTES_PER_IMAGE,
            f"old way {h['traced'] / mib:.0f} MiB ({h['traced'] / n / 1024:.0f} KiB/image); "
            f"read_series {s['traced'] / mib:.0f} MiB",
            f"{g['traced'] / h['traced']:.3f}x old way, {g['traced'] / s['traced']:.3f}x read_series"),
        Row(f"gate process RSS rise, `VmHWM` - `VmRSS` before (runs {runs('gate', 'rss', mib, '.1f')} MiB)",
            f"{g['rss'] / mib:.1f} MiB", "-", None,
            f"old way {h['rss'] / mib:.0f} MiB; read_series {s['rss'] / mib:.0f} MiB",
            f"{g['rss'] / max(h['rss'], 1):.3f}x old way, {g['rss'] / max(s['rss'], 1):.3f}x read_series"),
    ]
    peak = max(m["peak"] for m in memory) / mib
    idle = memory[0]["idle"] / mib
    kept = memory[-1]["kept"] / mib
    rows.append(Row(f"service peak RSS above idle, {n} instances received and made a job (`VmHWM` - warm idle "
                    f"`VmRSS`), highest of {len(memory)}", f"{peak:.0f} MiB", f"< {TARGET_LARGE_RSS_MB} MB",
                    peak * mib < TARGET_LARGE_RSS_MB * 1e6,
                    f"idle {idle:.0f} MiB, kept after the last job +{kept:.0f} MiB; runs "
                    + " / ".join(f"{m['peak'] / mib:.0f}" for m in memory) + " MiB", "-"))
    rows.extend(latency_rows(node, TARGET_LARGE_JOB_START, f" ({n} instances)"))
    return rows


# --- main ---------------------------------------------------------------------------------------------


def throughput_rows(n: int, mb: float, node: Postbox, scp: Receiver, decode: Receiver,
                    raw: Receiver) -> list[Row]:
    receivers = [node, scp, decode, raw]
    med = {r: statistics.median(r.times) for r in receivers}
    rate = {r: n / med[r] for r in receivers}

    def speed(r: Receiver) -> str:
        cpu = statistics.median(r.cpus) / n * 1000
        return f"{rate[r]:,.0f} inst/s, {mb / med[r]:,.0f} MB/s (CPU {cpu:.2f} ms/inst)"

    def rounds(r: Receiver) -> str:
        return "runs " + " / ".join(f"{s:.2f}" for s in r.times) + " s"

    rows = []
    for r in (scp, decode, raw):
        rows.append(Row(f"{r.label}, median of {len(r.times)} ({rounds(r)})", speed(r), "-", None,
                        f"storescp {rate[scp]:,.0f} inst/s", f"{rate[r] / rate[scp]:.2f}x"))
    rows.append(Row(f"{node.label}, median of {len(node.times)} ({rounds(node)})", speed(node),
                    f">= {TARGET_VS_STORESCP}x storescp", rate[node] / rate[scp] >= TARGET_VS_STORESCP,
                    f"storescp {rate[scp]:,.0f} inst/s", f"{rate[node] / rate[scp]:.2f}x"))
    rows.append(Row("Postbox node against the decode-and-save pynetdicom SCP", f"{rate[node]:,.0f} inst/s",
                    f">= {TARGET_VS_DECODE}x", rate[node] / rate[decode] >= TARGET_VS_DECODE,
                    f"decode and save {rate[decode]:,.0f} inst/s", f"{rate[node] / rate[decode]:.2f}x"))
    rows.append(Row("Postbox node against the as-received pynetdicom SCP", f"{rate[node]:,.0f} inst/s", "-", None,
                    f"as received {rate[raw]:,.0f} inst/s", f"{rate[node] / rate[raw]:.2f}x"))
    echo_ms = {r: statistics.median(r.echoes) * 1000 for r in receivers}
    rows.append(Row(f"association set-up + C-ECHO + release, `echoscu` process, median of {len(node.echoes)}",
                    f"node {echo_ms[node]:.0f} ms", "-", None,
                    f"storescp {echo_ms[scp]:.0f} ms, pynetdicom SCP {echo_ms[raw]:.0f} ms",
                    f"{echo_ms[node] / echo_ms[raw]:.2f}x pynetdicom"))
    rows.extend(latency_rows(node, TARGET_JOB_START, ""))
    return rows


def tls_rows(n: int, mb: float, node: Postbox, scp: Receiver, node_tls: Postbox, scp_tls: Receiver) -> list[Row]:
    """DICOM over TLS: the node with ``dicom.tls`` against ``storescp +tls``, and what TLS costs each."""
    med = {r: statistics.median(r.times) for r in (node, scp, node_tls, scp_tls)}
    rate = {r: n / m for r, m in med.items()}
    cpu = {r: statistics.median(r.cpus) / n * 1000 for r in med}

    def runs(r: Receiver) -> str:
        return "runs " + " / ".join(f"{s:.2f}" for s in r.times) + " s"

    def speed(r: Receiver) -> str:
        return f"{rate[r]:,.0f} inst/s, {mb / med[r]:,.0f} MB/s (CPU {cpu[r]:.2f} ms/inst)"

    echo_ms = {r: statistics.median(r.echoes) * 1000 for r in med}
    start = statistics.median(lat["start"] for lat in node_tls.latencies)
    return [
        Row(f"{scp_tls.label}, median of {len(scp_tls.times)} ({runs(scp_tls)})", speed(scp_tls), "-", None,
            f"storescp plain {rate[scp]:,.0f} inst/s", f"{rate[scp_tls] / rate[scp]:.2f}x"),
        Row(f"{node_tls.label}, median of {len(node_tls.times)} ({runs(node_tls)})", speed(node_tls), "-", None,
            f"storescp +tls {rate[scp_tls]:,.0f} inst/s", f"{rate[node_tls] / rate[scp_tls]:.2f}x"),
        Row("Postbox node over TLS against the plain node", f"{rate[node_tls]:,.0f} inst/s", "-", None,
            f"plain node {rate[node]:,.0f} inst/s (CPU {cpu[node]:.2f} ms/inst)",
            f"{rate[node_tls] / rate[node]:.2f}x"),
        Row(f"association set-up over TLS (handshake) + C-ECHO + release, `echoscu +tls` process, median of "
            f"{len(node_tls.echoes)}", f"node {echo_ms[node_tls]:.0f} ms", "-", None,
            f"storescp +tls {echo_ms[scp_tls]:.0f} ms; plain node {echo_ms[node]:.0f} ms",
            f"{echo_ms[node_tls] / echo_ms[scp_tls]:.2f}x storescp +tls"),
        Row(f"job start after release over TLS, median of {len(node_tls.latencies)}", f"{start:.3f} s",
            f"< {TARGET_JOB_START} s", start < TARGET_JOB_START,
            "plain node " + f"{statistics.median(lat['start'] for lat in node.latencies):.3f} s", "-"),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slices", type=int, default=300, help="slices of the CT phantom (default 300)")
    p.add_argument("--size", type=int, default=512, help="rows and columns of each slice (default 512)")
    p.add_argument("--instances", type=int, default=2000,
                   help="instances of the large series for the gate, the service's memory and job start "
                        "(default 2000; 0 leaves it out)")
    p.add_argument("--large-only", action="store_true",
                   help="only the large series: no throughput against the other receivers")
    p.add_argument("--tls-only", action="store_true",
                   help="only the node and storescp, plain and over TLS: no pynetdicom SCPs, no large series")
    p.add_argument("--no-tls", action="store_true", help="leave out the node and storescp over TLS")
    p.add_argument("--repeat", type=int, default=3, help="rounds; the figure is their median (default 3)")
    p.add_argument("--echoes", type=int, default=7, help="echoscu runs per receiver (default 7)")
    p.add_argument("--profile", action="store_true", help="also profile an in-process node (cProfile)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (its path is printed)")
    args = p.parse_args(argv)
    if args.tls_only and (args.no_tls or args.large_only):
        p.error("--tls-only goes with neither --no-tls nor --large-only")
    for tool in (STORESCU, STORESCP, ECHOSCU):
        if not os.access(tool, os.X_OK):
            print(f"bench: {tool} is missing (apt-get install -y dcmtk)", file=sys.stderr)
            return 2
    base = Path(tempfile.mkdtemp(prefix="postbox-bench-dicom-"))
    notes: list[str] = []
    t_all = time.perf_counter()
    receivers: list[Receiver] = []
    throughput: tuple[Postbox, Receiver, Receiver, Receiver] | None = None
    over_tls: tuple[Postbox, Receiver, Postbox, Receiver] | None = None
    large: tuple[dict[str, dict[str, list[float]]], Postbox, list[dict[str, float]]] | None = None
    profile_text = ""
    n = mb = big_mb = 0.0
    try:
        small = phantom.write_dicom(base / "warmup", phantom.axial_grid(slices=4, size=32))
        if not args.large_only:
            t = time.perf_counter()
            files = phantom.write_dicom(base / "ct", phantom.axial_grid(slices=args.slices, size=args.size))
            n = len(files)
            mb = sum(f.stat().st_size for f in files) / 1e6
            notes.append(f"phantom: {n} instances, {mb:.1f} MB ({mb / n * 1000:.0f} kB each), written in "
                         f"{time.perf_counter() - t:.1f} s")

            node = Postbox(base / "postbox")
            scp = Storescp(base / "storescp")
            decode = PlainScp(base / "pyscp-decode", "decode")
            raw = PlainScp(base / "pyscp-raw", "raw")
            receivers.extend([node, scp] if args.tls_only else [node, scp, decode, raw])
            if not args.no_tls:
                make_certificates(base / "certs", ["localhost", "127.0.0.1"])
                node_tls = Postbox(base / "postbox-tls", base / "certs")
                scp_tls = StorescpTls(base / "storescp-tls", base / "certs")
                receivers.extend([node_tls, scp_tls])
                over_tls = (node, scp, node_tls, scp_tls)
            for r in receivers:
                r.start()
            for r in receivers:
                if isinstance(r, Postbox):
                    r.send(base / "warmup", len(small), record=False)
                    notes.append(f"warm-up job of {r.label} (4 slices, cold algorithm child): storescu exit -> "
                                 f"algorithm_started {r.warmup['start']:.3f} s")
            for r in receivers:
                r.echo_times(args.echoes)

            for _ in range(args.repeat):
                for r in receivers:
                    os.sync()
                    r.send(base / "ct", int(n))
            if args.profile:
                os.sync()
                profile_text = profile_node(base, base / "ct")
            for r in receivers:
                r.stop()
            if not args.tls_only:
                throughput = (node, scp, decode, raw)
        if args.instances > 0 and not args.tls_only:
            t = time.perf_counter()
            big = write_series(base / "large", args.instances, args.size)
            big_mb = sum(f.stat().st_size for f in big) / 1e6
            notes.append(f"large series: {len(big)} instances, {big_mb:.0f} MB, written in "
                         f"{time.perf_counter() - t:.0f} s ({CHUNK} slices at a time)")
            os.sync()
            gates = measure_gate(base / "large", base / "warmup", args.repeat)
            node_large = Postbox(base / "postbox-large")
            receivers.append(node_large)
            node_large.start()
            node_large.send(base / "warmup", len(small), record=False)
            memory = measure_service(node_large, base / "large", len(big), args.repeat)
            node_large.stop()
            large = (gates, node_large, memory)
    finally:
        for r in receivers:
            r.stop()
            if isinstance(r, Postbox):
                notes.extend(r.problems())
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)

    rows: list[Row] = []
    if throughput is not None:
        rows.extend(throughput_rows(int(n), mb, *throughput))
    if over_tls is not None:
        rows.extend(tls_rows(int(n), mb, *over_tls))
    if large is not None:
        rows.extend(large_rows(large[0], args.instances, large[1], large[2]))

    print(f"# Postbox DICOM node benchmark ({os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"{time.perf_counter() - t_all:.0f} s)\n")
    if throughput is not None or over_tls is not None:
        print(f"{n:.0f} CT instances of {args.size}x{args.size} ({mb:.0f} MB), one `storescu +sd` association "
              "each, TCP_NODELAY=1; figures are medians of the interleaved rounds.\n")
    if large is not None:
        print(f"Large series: {args.instances} CT instances of {args.size}x{args.size} ({big_mb:.0f} MB) for "
              "the gate, the service's memory and job start.\n")
    head = ["figure", "measured", "target", "result", "reference (same run)", "ratio"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in rows:
        print("| " + " | ".join(row.cells) + " |")
    if notes:
        print("\nNotes:")
        for note in notes:
            print(f"- {note}")
    if profile_text:
        print("\n```\n" + profile_text.rstrip() + "\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
