"""Run one job's algorithm in a child process with a timeout (rq's work horse), warm or cold.

A Python algorithm runs in ``python -m pipeline._child``, which may stay alive between jobs
(``worker.keep_warm``) so a model loads once; a command-line algorithm runs as its own process group.
Whatever goes wrong in the child (exception, timeout, crash) becomes an AlgorithmFailed for its job only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import selectors
import shlex
import shutil
import signal
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .checks import looks_like_dicom
from .config import AlgorithmConfig
from .dataobject import DataObject
from .errors import AlgorithmFailed, DiskFull, PostboxError
from .health import free_bytes, is_disk_full_errno

log = logging.getLogger(__name__)

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
# A command that fails while its filesystem has less than this free most likely failed for want of space.
_NEARLY_FULL = 1 << 20


class PoolClosed(PostboxError):
    """The pool is closed: the worker is stopping, so a job is given back rather than started."""


def describe_exit(returncode: int | None) -> str:
    """How a process ended, in words (rq records how its work horse died)."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by signal {name}"
    return f"exit code {returncode}"


class Child:
    """One ``pipeline._child`` process serving jobs of one algorithm."""

    def __init__(self, alg: AlgorithmConfig, *, own_group: bool = False) -> None:
        self.alg = alg
        self.own_group = own_group
        self.jobs = 0
        # The algorithm's module file and its [mtime_ns, size] as the child imported it (from its first reply).
        self.source: str | None = None
        self.source_stamp: list[int] | None = None
        env = dict(os.environ, POSTBOX_PARENT_PID=str(os.getpid()), PYTHONUNBUFFERED="1")
        package_root = _PACKAGE_ROOT
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline._child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            env=env,
            close_fds=True,
            # Not the service's own folder: a pipeline.py there would shadow the package in the child.
            cwd=package_root,
            # On a GPU node the child leads its own process group, so a kill takes whatever it started too.
            start_new_session=own_group,
        )
        self._buffer = b""
        log.debug("algorithm %s: child %d started", alg.name, self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stale(self) -> bool:
        """True when the algorithm's source file changed since this child imported it (service.py edited)."""
        if self.source is None or self.source_stamp is None:
            return False
        try:
            st = os.stat(self.source)
        except OSError:
            return True
        return [st.st_mtime_ns, st.st_size] != self.source_stamp

    def run(self, job_id: str, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one job and wait for its reply; AlgorithmFailed on timeout or death."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.jobs += 1
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode("utf-8"))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.kill()
            raise AlgorithmFailed(job_id, f"algorithm process died ({describe_exit(self.proc.poll())})") from None
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.kill()
                    raise AlgorithmFailed(job_id, f"timed out after {timeout:g} s (worker.job_timeout); "
                                                  "its process was killed")
                try:
                    if not sel.select(remaining):
                        continue
                    chunk = os.read(fd, 65536)
                except OSError as exc:
                    self.kill()
                    raise AlgorithmFailed(job_id, "lost the algorithm process's reply channel "
                                                  f"({exc.strerror or type(exc).__name__})") from None
                if not chunk:
                    self.proc.wait()
                    raise AlgorithmFailed(job_id, f"algorithm process died ({describe_exit(self.proc.returncode)})")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            self.kill()
            raise AlgorithmFailed(job_id, "the algorithm process answered garbage on its reply channel: "
                                          f"{line[:80]!r}") from None

    def signal_kill(self) -> None:
        """SIGKILL the process only: its job's thread, reading its pipe, sees it die and cleans up.

        Closing the pipes from another thread would pull the file descriptor from under that read (EBADF, or
        worse, a number already reused), and the job would fail instead of being given back.
        """
        if self.proc.poll() is None:
            self._kill()

    def _kill(self) -> None:
        if self.own_group:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
                return
            except OSError:
                pass
        self.proc.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self._kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

    def close(self) -> None:
        """Let the child end by closing its stdin; kill it if it does not."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class ChildPool:
    """Idle warm children per algorithm; a busy child belongs to the job running in it."""

    def __init__(self, *, keep_warm: bool, max_jobs_per_child: int, own_group: bool = False) -> None:
        self.keep_warm = keep_warm
        self.own_group = own_group
        # A child is killed when the *thread* that started it ends (PR_SET_PDEATHSIG follows the thread). The
        # worker's job threads live as long as it does; elsewhere (a GPU node, whose warm-up thread ends) one
        # thread of the pool's own starts every child.
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="child-spawner") if own_group else None
        self.max_jobs_per_child = max_jobs_per_child
        self._idle: dict[str, list[Child]] = {}
        self._busy: set[Child] = set()
        self._lock = threading.Lock()
        self._closed = False

    def take(self, alg: AlgorithmConfig) -> Child:
        with self._lock:
            if self._closed:
                raise PoolClosed("the worker is stopping")
            idle = self._idle.get(alg.name, [])
            while idle:
                child = idle.pop()
                if child.alive() and child.alg == alg:
                    if not child.stale():
                        self._busy.add(child)
                        return child
                    log.info("algorithm %s: %s changed; a fresh process takes the next job", alg.name,
                             Path(child.source or "").name)
                child.kill()
            if self._spawner is not None:
                child = self._spawner.submit(Child, alg, own_group=True).result()
            else:
                child = Child(alg)
            self._busy.add(child)
            return child

    def give_back(self, child: Child) -> None:
        with self._lock:
            self._busy.discard(child)
            keep = (self.keep_warm and not self._closed and child.alive()
                    and child.jobs < self.max_jobs_per_child)
            if keep:
                self._idle.setdefault(child.alg.name, []).append(child)
                return
        child.close()

    def discard(self, child: Child) -> None:
        with self._lock:
            self._busy.discard(child)
        child.kill()

    def close(self) -> None:
        """Stop every child, busy ones included (their jobs are given back by the worker)."""
        with self._lock:
            self._closed = True
            idle = [c for children in self._idle.values() for c in children]
            busy = list(self._busy)
            self._idle.clear()
        for child in idle:
            child.kill()
        for child in busy:
            child.signal_kill()  # its job's thread discards it (run_python), closing its pipes there
        if self._spawner is not None:
            self._spawner.shutdown(wait=False)


def warm(pool: ChildPool, alg: AlgorithmConfig, timeout: float) -> float:
    """Start ``alg``'s child and import its module now (a model loaded at import loads here); returns the
    seconds the import took. The child then waits in the pool for the first job."""
    request = {"module": alg.module, "attr": alg.attr, "search_path": alg.search_path, "load_only": True,
               "working_dir": os.getcwd(), "settings": {}, "log_path": os.devnull}
    child = pool.take(alg)
    try:
        reply = child.run(f"warm-up of {alg.name}", request, timeout)
    except BaseException:
        pool.discard(child)
        raise
    if not reply.get("ok"):
        pool.discard(child)
        raise AlgorithmFailed(f"warm-up of {alg.name}", reply.get("error", "the import failed"))
    child.source, child.source_stamp = reply.get("source"), reply.get("source_stamp")
    pool.give_back(child)
    return float(reply["load_seconds"])


def run_python(pool: ChildPool, alg: AlgorithmConfig, job_id: str, inputs: list[DataObject], working_dir: Path,
               settings: dict[str, Any], log_path: Path, timeout: float,
               started: Callable[[Child | None], None] | None = None) -> tuple[list[DataObject], dict[str, float]]:
    """Run a Python algorithm in a (possibly warm) child; returns outputs and timings.

    ``started`` is told the child once the job is in it, and None once it is out (a GPU node kills the child
    of an attempt it is told to stop).
    """
    request = {
        "module": alg.module, "attr": alg.attr, "search_path": alg.search_path,
        "data_objects": [{"type": d.type, "path": d.path, "meta_data": d.meta_data, "id": d.id} for d in inputs],
        "working_dir": str(working_dir), "settings": settings, "log_path": str(log_path),
    }
    child = pool.take(alg)
    if started is not None:
        started(child)
    try:
        reply = child.run(job_id, request, timeout)
    except BaseException:
        pool.discard(child)
        raise
    finally:
        if started is not None:
            started(None)
    if reply.get("ok") or is_disk_full_errno(reply.get("errno")):
        if reply.get("ok"):
            child.source, child.source_stamp = reply.get("source"), reply.get("source_stamp")
        pool.give_back(child)  # a full disk is no fault of the process: it stays warm while the job waits
    else:
        # The function raised: it may have left its process half-changed (a global, a GPU), so a fresh
        # process takes the next job, as the README says.
        pool.discard(child)
    if not reply.get("ok"):
        if is_disk_full_errno(reply.get("errno")):
            # The algorithm's own write met a full disk: the job waits for space, its attempt not counted.
            raise DiskFull(f"the algorithm of job {job_id}: {reply.get('error')}")
        raise AlgorithmFailed(job_id, reply.get("error", "the algorithm failed"))
    by_id = {d.id: d for d in inputs}
    outputs = [DataObject(type=o["type"], path=o["path"], meta_data=o.get("meta_data") or {}, id=o.get("id"),
                          parent=by_id.get(o.get("parent"))) for o in reply["outputs"]]
    timings = {"algorithm_started": reply["started"], "algorithm_ended": reply["ended"],
               "load_seconds": reply["load_seconds"]}
    return outputs, timings


#: The command form's placeholders, each with what it stands for (the README lists them).
PLACEHOLDERS = {
    "input": "the job's input folder",
    "input_file": "the job's one input file (a job of one file only)",
    "series": "the job's first DICOM series folder (a DICOM job only)",
    "output": "an empty folder; every entry written there becomes an output",
    "settings": "a JSON file of the merged settings",
    "working_dir": "the job's working folder",
    "job_id": "the job's id",
}
#: How much of a failed command's stderr its job's error quotes.
_TAIL_LINES, _TAIL_LINE_CHARS, _TAIL_BYTES = 5, 200, 8192
# An absolute path, up to its last part: a job's error names files, not the server's folders (issue 9).
_FOLDERS = re.compile(r"(?<![^\s'\"(=:,\[])/(?:[^\s/'\"]+/)+")


def run_command(alg: AlgorithmConfig, job_id: str, input_dir: Path, working_dir: Path, settings: dict[str, Any],
                log_path: Path, timeout: float, stop: threading.Event | None = None,
                inputs: list[DataObject] | None = None) -> tuple[list[DataObject], dict[str, float]]:
    """Run a command-line algorithm; every entry it writes to ``{output}`` becomes an output.

    A program given with a ``/`` (``./tools/segment.sh``) is found from the algorithm's folder (config.yaml's);
    a bare name through PATH. When it fails, the last lines of its stderr go into the job's error.
    """
    out_dir = working_dir / "output"
    out_dir.mkdir(exist_ok=True)
    settings_file = working_dir / "settings.json"
    settings_file.write_text(json.dumps(settings), encoding="utf-8")
    values = {"input": str(input_dir), "output": str(out_dir), "settings": str(settings_file),
              "working_dir": str(working_dir), "job_id": job_id}
    files = [d for d in inputs or () if d.type == "FILE"]
    if len(files) == 1 and len(inputs or ()) == 1:
        values["input_file"] = str(files[0].path)
    series = [d for d in inputs or () if d.type == "DICOM"]
    if series:
        values["series"] = str(series[0].path)
    used = {name for arg in alg.command or () for _, name, _, _ in string.Formatter().parse(arg) if name}
    for name, kind in (("input_file", "one input file"), ("series", "a DICOM series")):
        if name in used and name not in values:
            raise AlgorithmFailed(job_id, f"the command's {{{name}}} needs a job of {kind}; this job has "
                                          f"{len(series)} DICOM series and {len(files)} file(s) as input")
    try:
        argv = [arg.format(**values) for arg in alg.command or ()]
    except (KeyError, IndexError, ValueError) as exc:
        raise AlgorithmFailed(job_id, f"command has an unknown placeholder {exc} "
                                      f"(known: {', '.join('{' + k + '}' for k in PLACEHOLDERS)})") from None
    exe = argv[0]
    if "/" in exe and not os.path.isabs(exe):
        argv[0] = str(Path(alg.search_path or working_dir) / exe)
    with open(log_path, "ab") as logfh:
        logfh.write(f"$ {shlex.join(argv)}\n".encode())
        logfh.flush()
        started = time.time()
        if not (Path(argv[0]).is_file() if "/" in exe else shutil.which(exe)):
            where = "" if os.path.isabs(exe) else " (looked on PATH)" if "/" not in exe else \
                " (looked in config.yaml's folder)"
            raise AlgorithmFailed(job_id, f"command {exe!r} cannot start: not found{where}")
        env = dict(os.environ, POSTBOX_PARENT_PID=str(os.getpid()))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        try:
            # Through the _exec shim, so the command dies with this worker (a SIGKILL included).
            proc = subprocess.Popen([sys.executable, "-m", "pipeline._exec", *argv], stdin=subprocess.DEVNULL,
                                    stdout=logfh, stderr=subprocess.PIPE, cwd=working_dir, env=env,
                                    start_new_session=True)
        except OSError as exc:
            raise AlgorithmFailed(job_id, f"command {exe!r} cannot start: {exc.strerror}") from None
        stderr = _StderrTail(proc, logfh)
        deadline = time.monotonic() + timeout
        while True:
            try:
                proc.wait(timeout=0.05 if stop is not None else max(0.0, deadline - time.monotonic()))
                break
            except subprocess.TimeoutExpired:
                if (stop is not None and stop.is_set()) or time.monotonic() >= deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    stderr.join()
                    if stop is not None and stop.is_set():
                        raise AlgorithmFailed(job_id, "interrupted: the worker is stopping") from None
                    raise AlgorithmFailed(job_id, f"timed out after {timeout:g} s; its process group was killed") \
                        from None
        stderr.join()
    ended = time.time()
    if proc.returncode != 0:
        if free_bytes(working_dir) < _NEARLY_FULL:
            raise DiskFull(f"the command of job {job_id} failed ({describe_exit(proc.returncode)}) "
                           "with its filesystem full")
        tail = stderr.last_lines()
        raise AlgorithmFailed(job_id, f"command {exe!r} failed ({describe_exit(proc.returncode)})"
                                      + (f"; the end of its stderr: {tail}" if tail else ""))
    outputs = [DataObject(type="DICOM" if looks_like_dicom(p) else "FILE", path=str(p))
               for p in sorted(out_dir.iterdir()) if not p.name.startswith(".")]
    return outputs, {"algorithm_started": started, "algorithm_ended": ended, "load_seconds": 0.0}


class _StderrTail:
    """Copies a command's stderr into its job's log as it comes, keeping the last bytes for the job's error."""

    def __init__(self, proc: subprocess.Popen[bytes], logfh: Any) -> None:
        self._pipe = proc.stderr
        self._logfh = logfh
        self._tail = b""
        self._thread = threading.Thread(target=self._copy, name=f"stderr-{proc.pid}", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        assert self._pipe is not None
        try:
            while chunk := os.read(self._pipe.fileno(), 65536):
                self._tail = (self._tail + chunk)[-_TAIL_BYTES:]
                try:
                    self._logfh.write(chunk)
                    self._logfh.flush()
                except (OSError, ValueError):
                    pass  # job.log on a full disk: the tail still makes the error
        except OSError:
            pass

    def join(self) -> None:
        """Wait for the pipe's end (the command's whole group has gone), then close it."""
        self._thread.join(timeout=5)  # a grandchild that left the group may hold the pipe: do not hang on it
        if not self._thread.is_alive() and self._pipe is not None:
            self._pipe.close()

    def last_lines(self) -> str:
        """The last lines of stderr, each cut short, without the server's folders; "" when it wrote nothing."""
        lines = [line.strip() for line in self._tail.decode("utf-8", "replace").splitlines() if line.strip()]
        return " | ".join(_FOLDERS.sub("", line)[:_TAIL_LINE_CHARS] for line in lines[-_TAIL_LINES:])
